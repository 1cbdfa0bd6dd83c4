"""Pruned models train under ``torch.nn.parallel.DistributedDataParallel`` (``torchrun --nproc_per_node 2``, gloo,
CPU): a graph-mode and a module-mode result each take one SGD step on per-rank batches, after which both ranks hold
bit-identical parameters, changed by the step, whose gradient is the mean of the ranks' local gradients."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun import run_torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")
MODES = ["graph", "module"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun(WORKER, str(out), ",".join(MODES))
    return out


@pytest.mark.xdist_group("ddp-torchrun")  # one worker runs the torchrun fixture once
@pytest.mark.parametrize("mode", MODES)
def test_ddp_step_averages_gradients_and_keeps_ranks_identical(results: Path, mode: str) -> None:
    r0, r1 = (torch.load(results / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):  # graph mode: a GraphModule; module mode: the user's class
        assert (r["graph_module"], r["own_class"]) == ((True, False) if mode == "graph" else (False, True))
    for key, value in r0["before"].items():
        assert torch.equal(value, r1["before"][key]), key  # the same plan and weights on both ranks
        assert torch.equal(r0["after"][key], r1["after"][key]), key  # bit-identical after the step
        mean = (r0["local_grad"][key] + r1["local_grad"][key]) / 2
        torch.testing.assert_close(r0["ddp_grad"][key], mean, msg=lambda m, key=key: f"{key}: {m}")
    assert not torch.equal(r0["local_grad"]["fc.weight"], r1["local_grad"]["fc.weight"])  # the batches differ
    moved = {k for k, g in r0["ddp_grad"].items() if g.abs().max() > 1e-6}  # conv biases before BN: ~0 grads
    assert len(moved) > len(r0["before"]) // 2
    unchanged = {k for k in moved if torch.equal(r0["before"][k], r0["after"][k])}
    assert not unchanged, f"parameters the step left unchanged: {unchanged}"
