"""Data-parallel calibration under ``torchrun --nproc_per_node 2`` (gloo, CPU): for taylor, catro and the iterative
stage, each with ``recover: [bn, bias, lstsq]`` on rank-sharded batches, both ranks make the same plan and
bit-identical weights, equal to one process on all the batches; the iterative stage splits its evaluations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun import run_torchrun

from fxprune import distributed
from fxprune.testing import state_digest

WORKER = Path(__file__).with_name("dist_worker.py")


def test_helpers_are_no_ops_in_one_process() -> None:
    t = torch.arange(3.0)
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.all_reduce_count(5) == 5.0 and distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]


class _Weights(torch.nn.Module):
    def __init__(self, state: dict) -> None:
        super().__init__()
        for i, (k, v) in enumerate(state.items()):
            self.register_buffer(f"t{i}_{k.replace('.', '_')}", v)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run_torchrun(WORKER, str(out))
    return out


@pytest.mark.xdist_group("recover-torchrun")  # one worker runs the torchrun fixture once
@pytest.mark.parametrize("name", ["taylor", "catro", "iterative"])
def test_ranks_agree_with_each_other_and_with_one_process(results: Path, name: str) -> None:
    r0, r1, single = (torch.load(results / f"{name}_{s}.pt", weights_only=False) for s in ("rank0", "rank1", "single"))
    assert r0["plan"] == r1["plan"] == single["plan"]
    assert state_digest(_Weights(r0["state"])) == state_digest(_Weights(r1["state"]))  # bit-identical weights
    assert r0["state"].keys() == single["state"].keys()
    for key, value in single["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(r0["state"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(r0["state"][key], value), key
    if name == "iterative":  # the sweep's evaluations were split between the ranks
        assert r0["evaluated"] > 0 and r1["evaluated"] > 0
        assert r0["evaluated"] + r1["evaluated"] == single["evaluated"]
