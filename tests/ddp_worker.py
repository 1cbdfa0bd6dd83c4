"""Worker of ``test_ddp.py``: ``torchrun --nproc_per_node 2 ddp_worker.py OUT graph,module`` (gloo, CPU).

Each rank prunes the same seeded model in each output mode, wraps the result in
``torch.nn.parallel.DistributedDataParallel`` and runs one SGD step on its own batch. Before the step it also
computes, on an unwrapped copy, the gradient of its own batch alone. It saves the parameters before and after the
step, DDP's gradients and its local ones to ``OUT/<mode>_rank<r>.pt``.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fixtures import ResCatNet  # tests/ is on PYTHONPATH (test_ddp.py)
from torch.nn.parallel import DistributedDataParallel

import fxprune

RECIPE = {"stages": [{"target": {"flops": 0.5}}]}


def prune(mode: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same model and plan on every rank
    model = ResCatNet(width=8, fuse=16, classes=3).eval()
    x = torch.randn(2, 3, 8, 8)
    kwargs = {} if mode == "graph" else {"output": mode}
    return fxprune.compile(model, RECIPE, example_inputs=x, **kwargs).train()


def step(mode: str, rank: int) -> dict:
    pruned = prune(mode)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    local = copy.deepcopy(pruned)
    torch.nn.functional.cross_entropy(local(x), y).backward()
    before = {k: v.detach().clone() for k, v in pruned.named_parameters()}
    ddp = DistributedDataParallel(pruned)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
    return {"graph_module": isinstance(pruned, torch.fx.GraphModule), "own_class": type(pruned) is ResCatNet,
            "before": before,
            "after": {k: v.detach().clone() for k, v in pruned.named_parameters()},
            "ddp_grad": {k: v.grad.clone() for k, v in pruned.named_parameters()},
            "local_grad": {k: v.grad.clone() for k, v in local.named_parameters()}}


def main(out: Path, modes: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for mode in modes:
        torch.save(step(mode, rank), out / f"{mode}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
