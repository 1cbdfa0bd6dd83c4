"""PaPr test fixtures: a tiny proposal ConvNet registered as ``tests:tiny``."""
from __future__ import annotations

import pytest
import torch
from papr_reference import TinyProposal
from torch import nn

import fxprune


@pytest.fixture(scope="session")
def tiny_proposal() -> nn.Module:
    torch.manual_seed(123)
    module = TinyProposal().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        module.body[1].running_mean.uniform_(-0.2, 0.2)
        module.body[1].running_var.uniform_(0.5, 1.5)
    fxprune.stages.patches.register_proposal("tests:tiny", module)
    return module
