"""Worker of ``test_distributed.py``: ``torchrun --nproc_per_node 2 dist_worker.py OUT`` (gloo, CPU).

Each rank prunes the same model on its shard of the calibration batches (``fxprune.distributed.shard``) for three
recipes (taylor, catro and the iterative stage, each with ``recover: [bn, bias, lstsq]``) and saves its plan, its
weights and the candidates it evaluated to ``OUT/<name>_rank<r>.pt``. Rank 0 then leaves the process group and
prunes again in one process on all the batches (``OUT/<name>_single.pt``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fixtures import ResCatNet  # tests/ is on PYTHONPATH (test_distributed.py)

import fxprune
from fxprune import distributed

RECOVER = ["bn", "bias", "lstsq"]
RECIPES = {
    "taylor": {"stages": [{"target": {"flops": 0.4}, "criterion": "taylor", "recover": RECOVER}]},
    "catro": {"stages": [{"target": {"flops": 0.4}, "criterion": "catro", "scope": "global", "recover": RECOVER}]},
    "iterative": {"stages": [{"kind": "iterative", "target": {"flops": 0.3}, "criterion": "taylor",
                              "rates": [0.25, 0.5], "layers_per_step": 2, "steps": 3, "recover": RECOVER}]},
}


def setup() -> tuple[torch.nn.Module, list, torch.Tensor]:
    torch.manual_seed(0)
    model = ResCatNet(width=8, fuse=16, classes=3)
    model.train()
    with torch.no_grad():  # running statistics of another distribution than the calibration batches
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 1.5 + 0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]
    val = torch.randn(16, 3, 6, 6, generator=g)
    return model.eval(), batches, val


def run(name: str, model: torch.nn.Module, data: list, val: torch.Tensor) -> dict:
    with torch.no_grad():
        want = model(val).argmax(1)
    evaluated: list[int] = []

    def evaluate(m: torch.nn.Module) -> float:  # the same value on every rank: a fixed validation batch
        with torch.no_grad():
            evaluated.append(len(evaluated))
            return float((m(val).argmax(1) == want).float().mean())

    pruned = fxprune.compile(model, RECIPES[name], example_inputs=val[:1], data=data, evaluate=evaluate)
    return {"plan": pruned.fxprune_plan.to_json(), "state": pruned.state_dict(), "evaluated": len(evaluated)}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = distributed.rank()
    model, batches, val = setup()
    for name in RECIPES:
        torch.save(run(name, model, distributed.shard(batches), val), out / f"{name}_rank{rank}.pt")
    dist.destroy_process_group()
    if rank == 0:
        for name in RECIPES:
            torch.save(run(name, model, batches, val), out / f"{name}_single.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
