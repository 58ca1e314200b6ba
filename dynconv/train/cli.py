"""Train DynamicCNN and its static twin on scikit-learn's handwritten digits.

    python -m dynconv.train --out runs/digits              # or: dynconv-train --out ...
    torchrun --nproc_per_node=2 -m dynconv.train --out runs/digits-ddp

Both models get the same data, seed, optimiser and cosine learning-rate schedule; the dynamic
model's router temperature falls linearly per step from 30 to 1 over the first third of the
epochs (DyConv anneals over about its first tenth), then stays at 1.
Rank 0 prints a progress bar per epoch (on a terminal), one line per epoch and a final table,
and writes into ``--out``: ``checkpoint.pt``, ``metrics.csv``, ``routing_per_class.csv``,
``results.md``, ``accuracy.png`` (test accuracy over training, mean +- std over the seeds) and,
per dynamic backend, ``routing_per_class_<backend>.png`` and ``routing_entropy_<backend>.png``
(the first seed's). Needs the ``train`` extra (scikit-learn, matplotlib, tqdm).

``--model odconv`` trains ``DynamicCNN(conv="odconv")`` instead: ODConv2d stages (four
attentions from each ODConvRouter), the same temperature schedule (it divides all four heads'
logits) and weight decay groups (none on the routers); the routing it reports and plots is
ODConv's kernel attention over the K experts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dynconv.backends.registry import BACKEND_NAMES
from dynconv.modules import DynamicCNN, DynamicConv2d, ODConv2d

from .data import TASKS, load_digits_split
from .dist import DistContext, setup, teardown
from .loop import DECAY_CHOICES, TrainConfig, fit
from .models import StaticCNN, count_multiply_adds, count_parameters
from .report import (
    ModelSummary,
    format_table,
    plot_accuracy,
    plot_routing_entropy,
    plot_routing_per_class,
    save_checkpoint,
    write_metrics_csv,
    write_routing_csv,
)

DEFAULT_LR = {"sgd": 0.1, "adamw": 2e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
STATIC_LABEL = "static CNN (nn.Conv2d)"
# --model: the dynamic model's convs (DynamicCNN's ``conv``) and how tables and plots name them.
MODELS = {"dynamic": "DynamicConv2d", "odconv": "ODConv2d"}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite float > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite float > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite float >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite float >= 0, got {value}")
    return value


def _backend(text: str) -> str:
    if text not in BACKEND_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown backend {text!r}; expected one of {', '.join(BACKEND_NAMES)}")
    return text


def _momentum(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1), got {value}")
    return value


def _per_optimizer(values: dict) -> str:
    return ", ".join(f"{value:g} with {name}" for name, value in values.items())


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help lines end with the option's default, where it has one that the text doesn't give."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        default = action.default
        if isinstance(default, list):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynconv-train",
        formatter_class=_DefaultsHelpFormatter,
        description="Train DynamicCNN and a static CNN of the same widths on scikit-learn's "
                    "handwritten digits (upsampled); the router temperature is annealed "
                    "linearly from 30 to 1 over the first third of the epochs.",
    )
    parser.add_argument("--out", type=Path, default=Path("dynconv-train-out"),
                        help="output folder (created; rank 0 writes here)")
    parser.add_argument("--epochs", type=_positive_int, default=18, help="training epochs")
    parser.add_argument("--batch-size", type=_positive_int, default=64,
                        help="global batch size, split evenly over torchrun's processes")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw",
                        help="optimiser of both models")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help=f"peak learning rate (default: {_per_optimizer(DEFAULT_LR)})")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=None,
                        help="weight decay (default: "
                             f"{_per_optimizer(DEFAULT_WEIGHT_DECAY)})")
    parser.add_argument("--momentum", type=_momentum, default=0.9, help="SGD momentum (Nesterov)")
    parser.add_argument("--decay", choices=DECAY_CHOICES, default="kernels",
                        help="which parameters get weight decay: 'kernels' as "
                             "dynconv.param_groups groups them (none on biases, norms, bias banks "
                             "and routers), or 'all'")
    parser.add_argument("--task", choices=TASKS, default="digits",
                        help="'digits', or 'digits-affine': every image randomly rotated, "
                             "scaled, sheared, shifted and noised (fixed, the same in every run)")
    parser.add_argument("--model", choices=tuple(MODELS), default="dynamic",
                        help="the dynamic model's convs: 'dynamic' (DynamicConv2d) or 'odconv' "
                             "(ODConv2d: kernel, input-channel, output-channel and tap "
                             "attentions; the schedule divides all four heads' logits)")
    parser.add_argument("--num-experts", type=_positive_int, default=4, help="K per dynamic conv")
    parser.add_argument("--widths", type=_positive_int, nargs=3, default=[32, 64, 128],
                        metavar="C", help="output channels of the three stages")
    parser.add_argument("--image-size", type=_positive_int, default=32,
                        help="digits are upsampled from 8x8 to this size")
    parser.add_argument("--temperature-start", type=_positive_float, default=30.0,
                        help="router temperature at the first step")
    parser.add_argument("--temperature-end", type=_positive_float, default=1.0,
                        help="router temperature after the anneal")
    parser.add_argument("--anneal-epochs", type=_positive_int, default=None,
                        help="epochs over which the temperature is annealed (default: a third "
                             "of --epochs, rounded up)")
    parser.add_argument("--backend", nargs="+", default=["auto"], type=_backend,
                        help="dynamic conv backend(s); one DynamicCNN is trained per backend "
                             f"({', '.join(BACKEND_NAMES)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of both models")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for initialisation and shuffling (the split is fixed)")
    parser.add_argument("--seeds", type=_positive_int, default=3,
                        help="train every model with this many seeds (--seed, --seed + 1, ...): "
                             "the table gives mean +- standard deviation over them")
    parser.add_argument("--train-subset", type=_positive_int, default=None,
                        help="train on only the first N of the 1,437 training images")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch intra-op threads per process (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-argument checks that argparse's per-argument types cannot do."""
    if args.anneal_epochs is None:
        args.anneal_epochs = math.ceil(args.epochs / 3)
    elif args.anneal_epochs > args.epochs:
        parser.error(f"argument --anneal-epochs: expected at most --epochs={args.epochs}, "
                     f"got {args.anneal_epochs}")
    if args.image_size < 8:
        parser.error(f"argument --image-size: expected an int >= 8, got {args.image_size}")
    if len(set(args.backend)) != len(args.backend):
        parser.error(f"argument --backend: expected distinct backends, got {args.backend}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' was asked for but torch sees no CUDA device")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]


def _check_backend(parser: argparse.ArgumentParser, backend: str, device: torch.device,
                   model: str = "dynamic") -> None:
    """Run one tiny dynamic conv (of ``model``'s kind) so an unusable backend fails now, not
    after the static model."""
    try:
        if model == "odconv":
            conv = ODConv2d(2, 2, 3, padding=1, backend=backend, device=device).eval()
        else:
            conv = DynamicConv2d(2, 2, 1, backend=backend, device=device)
        with torch.no_grad():
            conv(torch.zeros(1, 2, 2, 2, device=device))
    except (ValueError, ImportError) as err:
        parser.error(f"argument --backend: {backend!r} cannot run on {device}: {err}")


def _progress_factory(show: bool):
    if not show:
        return lambda desc: (lambda loader: loader)
    from tqdm import tqdm

    return lambda desc: (lambda loader: tqdm(loader, desc=desc, unit="batch", leave=True,
                                             dynamic_ncols=True))


def _commit_text() -> str:
    """The code's git commit, with "+ uncommitted changes" when dynconv/ has some."""
    from .ablation import provenance

    source = provenance()
    return source["commit"][:12] + (" + uncommitted changes" if source["uncommitted"] else "")


def _dynamic_label(args) -> str:
    """How tables and plots name the dynamic model: "DynamicCNN", "DynamicCNN of ODConv2d"."""
    return "DynamicCNN" if args.model == "dynamic" else f"DynamicCNN of {MODELS[args.model]}"


def _write_artifacts(out: Path, args, ctx: DistContext, rows, summaries, routing, models,
                     wall_seconds: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(out / "metrics.csv", rows)
    write_routing_csv(out / "routing_per_class.csv", routing)
    name = _dynamic_label(args)
    kernel = " (ODConv's kernel attention)" if args.model == "odconv" else ""
    for backend, stages in routing.items():
        plot_routing_per_class(
            out / f"routing_per_class_{backend}.png", stages,
            f"{name} (K={args.num_experts}, backend {backend}), seed {args.seed}: mean "
            f"routing weight{kernel} per class, test set, T={args.temperature_end:g}")
        backend_rows = [r for r in rows if r["model"] == "DynamicCNN" and r["backend"] == backend
                        and r["seed"] == args.seed]
        plot_routing_entropy(
            out / f"routing_entropy_{backend}.png", backend_rows, args.num_experts,
            f"{name} (backend {backend}), seed {args.seed}: routing entropy{kernel} on the "
            f"test set")
    plot_accuracy(out / "accuracy.png", rows,
                  f"test accuracy over training ({args.task}), mean and std over {args.seeds} "
                  f"seed(s)")
    table = format_table(summaries)
    run = {key: (str(value) if isinstance(value, Path) else value)
           for key, value in vars(args).items()}
    run.update(world_size=ctx.world_size, device_type=ctx.device.type,
               torch_version=str(torch.__version__), wall_seconds=wall_seconds)
    save_checkpoint(out / "checkpoint.pt", run, models["static"], models["dynamic"])
    settings = (f"{args.task}, dynamic model of {MODELS[args.model]}, {args.epochs} epochs, "
                f"batch {args.batch_size}, {args.optimizer} "
                f"lr {args.lr:g} wd {args.weight_decay:g} on {args.decay}, cosine; "
                f"T {args.temperature_start:g} -> {args.temperature_end:g} over "
                f"{args.anneal_epochs} epochs; seeds {args.seed}..{args.seed + args.seeds - 1} "
                f"(plots: seed {args.seed}); "
                f"{ctx.world_size} process(es) on {ctx.device.type}; "
                f"wall time {wall_seconds:.0f} s; code at {_commit_text()}")
    (out / "results.md").write_text(table + "\n" + settings + "\n")
    return table + "\n" + settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dynconv-train`` / ``python -m dynconv.train``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    started = time.perf_counter()
    ctx = setup(args.device)
    finished = False
    try:
        if args.batch_size % ctx.world_size:
            parser.error(f"argument --batch-size: expected a multiple of the {ctx.world_size} "
                         f"processes, got {args.batch_size}")
        for backend in args.backend:
            _check_backend(parser, backend, ctx.device, args.model)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        try:
            data = load_digits_split(args.image_size, args.train_subset, args.task)
        except ValueError as err:
            parser.error(f"argument --train-subset: {err}")
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
            lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            temperature_start=args.temperature_start, temperature_end=args.temperature_end,
            anneal_epochs=args.anneal_epochs, seed=args.seed, decay=args.decay,
        )
        log = (lambda text: print(text, flush=True)) if ctx.is_main else (lambda text: None)
        show = ctx.is_main and not args.no_progress and sys.stderr.isatty()
        progress = _progress_factory(show)
        input_shape = (1, args.image_size, args.image_size)
        log(f"{args.task}: {len(data.train_y)} train / {len(data.test_y)} test images at "
            f"{args.image_size}x{args.image_size}; {ctx.world_size} process(es) on "
            f"{ctx.device.type}")

        rows, routing = [], {}
        models = {"static": None, "dynamic": {}}
        summaries: dict[tuple[str, str], ModelSummary] = {}

        def record(label, backend, model, result):
            rows.extend(result.rows)
            known = summaries.get((label, backend))
            accuracies = (known.test_accuracies if known else []) + [result.final.accuracy]
            seconds = (known.epoch_seconds if known else []) + result.epoch_seconds
            summaries[label, backend] = ModelSummary(
                label, backend, accuracies, count_parameters(model),
                count_multiply_adds(model, input_shape), seconds)

        # Seeds run one after another; the plots and the checkpoint are the first seed's.
        for seed in range(args.seed, args.seed + args.seeds):
            seed_config = replace(config, seed=seed)
            torch.manual_seed(seed)
            static = StaticCNN(1, data.num_classes, args.widths)
            result = fit("static", "-", static, data, seed_config, ctx, False, progress, log)
            record(STATIC_LABEL, "-", static, result)
            models["static"] = models["static"] or static
            for backend in args.backend:
                torch.manual_seed(seed)
                dynamic = DynamicCNN(1, data.num_classes, num_experts=args.num_experts,
                                     widths=args.widths, temperature=args.temperature_start,
                                     backend=backend, conv=args.model)
                result = fit("DynamicCNN", backend, dynamic, data, seed_config, ctx, True,
                             progress, log)
                record(f"{_dynamic_label(args)} (K={args.num_experts})", backend, dynamic,
                       result)
                if backend not in routing:
                    routing[backend] = result.final.routing_per_class
                    models["dynamic"][backend] = dynamic
        summaries = list(summaries.values())

        if ctx.is_main:
            text = _write_artifacts(args.out, args, ctx, rows, summaries, routing, models,
                                    time.perf_counter() - started)
            log("\n" + text)
            log(f"wrote {args.out}")
        finished = True
    finally:
        teardown(ctx, barrier=finished)
    return 0
