"""The ``fxprune`` command line.

``fxprune prune torchvision:resnet50 --recipe recipe.yaml --out model.fxp`` prunes a torchvision or timm model
(``--target flops=0.5 --criterion l2`` instead of a recipe file), prints a before/after table (params, MACs,
CPU latency, frozen groups) on stdout and saves the result with ``fxprune.save``.
``fxprune demo [--quick]`` trains, prunes and fine-tunes a small CNN on scikit-learn's digits.

Exit codes: 0 success, 1 pruning failed (the message is printed; ``--verbose`` adds the traceback),
2 bad arguments (argparse's usage message).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import RecipeError
from .recipe import Recipe

if TYPE_CHECKING:
    from .report import Report

log = logging.getLogger("fxprune.cli")
TARGETS = ("sparsity", "flops", "params", "latency")


# -- argument types (an ArgumentTypeError becomes "error: argument ...: <message>" and exit code 2) -------------
def model_spec(text: str) -> tuple[str, str]:
    """``torchvision:<name>`` or ``timm:<name>``, checked against the library's model registry."""
    source, sep, name = text.partition(":")
    if not sep or not name or source not in ("torchvision", "timm"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a model: use torchvision:<name> (e.g. torchvision:resnet50) "
                                         f"or timm:<name> (e.g. timm:resnet18)")
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise argparse.ArgumentTypeError(f"torchvision has no classification model '{name}'{_close(name, known)}")
    else:
        try:
            import timm
        except ImportError as exc:
            raise argparse.ArgumentTypeError(f"timm is not installed ({exc}): pip install timm") from exc
        if not timm.is_model(name):
            raise argparse.ArgumentTypeError(f"timm has no model '{name}'{_close(name, timm.list_models())}")
    return source, name


def _close(name: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def target_spec(text: str) -> dict[str, float]:
    """``flops=0.5``, ``params=0.3``, ``sparsity=0.5`` or ``latency=0.4``: the fraction removed."""
    kind, sep, value = text.partition("=")
    if not sep or kind not in TARGETS:
        choices = ", ".join(k + "=<fraction>" for k in TARGETS)
        raise argparse.ArgumentTypeError(f"'{text}' is not a target: use one of {choices}")
    try:
        fraction = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"target '{kind}' needs a number in [0, 1), got '{value}'") from None
    if not 0.0 <= fraction < 1.0:
        raise argparse.ArgumentTypeError(f"target '{kind}' must be in [0, 1), got {fraction}")
    return {kind: fraction}


def round_to_spec(text: str) -> int | str:
    """A positive integer or ``auto``."""
    return "auto" if text == "auto" else positive_int(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description="Prune channels of PyTorch vision models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs", type=positive_int, default=10,
                        help="timed runs per latency figure (median; default 10)")
    common.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    common.add_argument("--verbose", "-v", action="store_true", help="log progress and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{prune,demo}")

    p = sub.add_parser("prune", parents=[common], help="prune a torchvision or timm model and save it",
                       description="Prune a torchvision or timm model (random weights unless you load your own "
                                   "through the Python API), print a before/after table and save the result.")
    p.add_argument("model", type=model_spec, help="torchvision:<name> or timm:<name>")
    p.add_argument("--recipe", help="a YAML/JSON recipe file or inline YAML/JSON text "
                                    "(instead of --target/--criterion)")
    p.add_argument("--target", type=target_spec,
                   help="what to remove, e.g. flops=0.5 (default), params=0.3, sparsity=0.5, latency=0.4 (measured "
                        "on this machine at --batch and --threads)")
    p.add_argument("--criterion", help="channel criterion (default l2); the CLI passes no calibration data, so use a "
                                       "data-free one: l1, l2, bn_scale, random")
    p.add_argument("--round-to", type=round_to_spec,
                   help="keep a multiple of this many channels per group (default 1), or 'auto' (per group, where its "
                        "measured latency steps)")
    p.add_argument("--out", help="write the pruned model here (a safetensors file, conventionally *.fxp)")
    p.add_argument("--input-size", type=positive_int, default=224,
                   help="height = width of the example input (default 224)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")
    p.set_defaults(run=cmd_prune, parser=p)

    d = sub.add_parser("demo", parents=[common], help="train, prune and fine-tune a small CNN on sklearn's digits",
                       description="Train a residual + concat CNN on scikit-learn's 8x8 digits, prune it to half its "
                                   "MACs, fine-tune briefly and compare accuracy, params, MACs and latency.")
    d.add_argument("--quick", action="store_true", help="fewer epochs (a few seconds)")
    d.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batch order (default 0)")
    d.set_defaults(run=cmd_demo, parser=d)
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file, or a one-stage channel recipe built from --target/--criterion/--round-to."""
    if args.recipe:
        if args.target or args.criterion or args.round_to:
            raise RecipeError("<cli>", "give either --recipe or --target/--criterion/--round-to, not both")
        return Recipe.load(args.recipe)
    stage: dict[str, Any] = {"kind": "channels", "target": args.target or {"flops": 0.5},
                             "criterion": args.criterion or "l2"}
    if args.round_to:
        stage["round_to"] = args.round_to
    return Recipe.load({"stages": [stage]})


def create_model(source: str, name: str, input_size: int | None = None) -> nn.Module:
    """A randomly initialised model from torchvision or timm, in eval mode. Models built for one image size (ViTs)
    are built for ``input_size`` when they take it (torchvision ``image_size``, timm ``img_size``)."""
    if source == "torchvision":
        import torchvision

        build, size_arg = (lambda **kw: torchvision.models.get_model(name, weights=None, **kw)), "image_size"
    else:
        import timm

        build, size_arg = (lambda **kw: timm.create_model(name, pretrained=False, **kw)), "img_size"
    if input_size is not None:
        try:
            return build(**{size_arg: input_size}).eval()
        except TypeError:  # the constructor takes no image size: any size runs through it
            pass
    return build().eval()


@torch.inference_mode()
def latency_ms(model: nn.Module, inputs: tuple, runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of one forward pass, in milliseconds, after ``warmup`` untimed passes."""
    model.eval()
    for _ in range(warmup):
        model(*inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """Rows of (label, before, after, ratio) as aligned text."""
    head = ("", "before", "after", "after/before")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]

    def fmt(r: Sequence[str]) -> str:
        return f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:]))

    return "\n".join([fmt(head), *map(fmt, rows)])


def compare(before: nn.Module, after: nn.Module, inputs: tuple,
            runs: int) -> tuple[list[tuple[str, str, str, str]], Report]:
    """Params, MACs and latency rows for the table, and the ``fxprune.Report``."""
    from .report import report

    rep = report(before, after, inputs)
    t0, t1 = latency_ms(before, inputs, runs), latency_ms(after, inputs, runs)
    rows = [("params", f"{rep.params[0]:,}", f"{rep.params[1]:,}", _ratio(*rep.params)),
            ("MACs", f"{rep.macs[0]:,}", f"{rep.macs[1]:,}", _ratio(*rep.macs)),
            (f"CPU latency (ms, median of {runs})", f"{t0:.2f}", f"{t1:.2f}", _ratio(t0, t1))]
    predicted = getattr(getattr(after, "fxprune_plan", None), "stats", {}).get("latency_predicted_ratio")
    if predicted is not None:
        rows.append(("latency predicted by the lookup table", "", f"{predicted * t0:.2f}", f"{predicted:.3f}x"))
    return rows, rep


def frozen_lines(rep: Report) -> list[str]:
    lines = [f"frozen groups: {len(rep.frozen)}"]
    for g in rep.frozen:
        params = ", ".join(p.lstrip("@") for p in g["params"][:4]) or "(no parameters)"
        lines.append(f"  {params}: {'; '.join(g['reasons'][:2])}")
    return lines


def cmd_prune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .api import compile as fx_compile
    from .serialize import save

    try:
        recipe = recipe_from_args(args)
    except RecipeError as exc:
        parser.error(str(exc))
    source, name = args.model
    torch.manual_seed(args.seed)
    model = create_model(source, name, args.input_size)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    pruned = fx_compile(model, recipe, example_inputs=x)
    rows, rep = compare(model, pruned, (x,), args.runs)
    print(f"{source}:{name}, input {args.batch}x3x{args.input_size}x{args.input_size}, {_describe(recipe)}")
    print(table(rows))
    print("\n".join(frozen_lines(rep)))
    if args.out:
        save(pruned, args.out, leaf_modules=recipe.leaf_modules, example_inputs=x)
        print(f"saved to {args.out}")
    return 0


def _describe(recipe: Recipe) -> str:
    return "; ".join(s.summary() for s in recipe.stages)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import demo

    result = demo.run(quick=args.quick, seed=args.seed)
    rows, rep = compare(result.original, result.pruned, (result.example,), args.runs)
    rows.insert(0, ("test accuracy (after fine-tuning)", f"{result.acc_before:.2%}", f"{result.acc_finetuned:.2%}",
                    _ratio(result.acc_before, result.acc_finetuned)))
    print(f"DigitsNet on sklearn digits (8x8), {_describe(Recipe.load(result.recipe))}, batch {len(result.example)}")
    print(table(rows))
    print(f"test accuracy right after pruning, before fine-tuning: {result.acc_pruned:.2%}")
    print("\n".join(frozen_lines(rep)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxprune`` console script and of ``python -m fxprune``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.run
    try:
        return run(args, args.parser)
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # report any failure of pruning as one line; --verbose shows where
        if args.verbose:
            traceback.print_exc()
        print(f"fxprune {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
