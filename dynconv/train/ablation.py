"""Routing ablations: what makes DynamicCNN's routing depend on the input, over several seeds.

    python -m dynconv.train.ablation --out perf_reports/training/ablation          # everything
    python -m dynconv.train.ablation --out DIR --variants today no-router-decay --seeds 0 1 2

Each *variant* is one full recipe (router initialisation, expert initialisation, which
parameters get weight decay, the temperature schedule, the task); each differs from ``today``
(the recipe before the ablation) in one thing, except the ``recommended`` ones, which combine
the winners, and the ``uniform-mix`` controls, which hold the routing uniform. Every
(variant, seed) pair is one run of :func:`dynconv.train.loop.fit` with the demo's budget (18
epochs, batch 64, AdamW 2e-3, cosine), in its own worker process with one intra-op thread;
``--jobs`` runs several at once. Each finished run appends one JSON line to ``DIR/runs.jsonl``
(a rerun skips what is there), and the table ``DIR/ablation.md`` (+ ``.csv``) and the figure
``DIR/ablation.png`` summarise mean +- standard deviation over the seeds:

- test accuracy;
- per dynamic stage: the mean per-image routing entropy as a fraction of log K (1 = uniform),
  the usage entropy (of the mean routing, also / log K), the mutual information between an
  image's class and an expert drawn from its routing (in bits), and the mean pairwise cosine
  distance between the stage's experts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from dynconv.modules import DynamicCNN, DynamicConv2d
from dynconv.routing import RoutingMLP

from .data import load_digits_split
from .dist import DistContext
from .loop import TrainConfig, fit
from .models import StaticCNN

EXPERT_INITS = ("independent", "scaled", "shared")
STAGES = 3


@dataclass(frozen=True)
class Recipe:
    """Everything one ablation run varies; the rest is the demo's defaults."""

    model: str = "dynamic"  # or "static": the twin with nn.Conv2d
    task: str = "digits"
    router_init: str = "small"
    expert_init: str = "independent"
    decay: str = "all"
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    anneal_epochs: int = 6
    num_experts: int = 4
    epochs: int = 18
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    image_size: int = 32
    widths: tuple[int, int, int] = (32, 64, 128)


TODAY = Recipe()
# The recipe the ablation recommends, now the library's and the demo's defaults: DyConv's router
# initialisation (the one change that moved the routing off uniform) and no weight decay on
# routers, biases and norms (neutral here, and what pulls logits towards a uniform mix).
RECOMMENDED = replace(TODAY, router_init="dyconv", decay="kernels")
# A control: the recommended recipe with the routing held uniform (T = 1e4 throughout: the mix is
# 1/K per expert to ~1e-4 whatever the input). What it gains over the static twin is the
# parameterisation (K kernels averaged), not input-dependent routing.
UNIFORM_MIX = replace(RECOMMENDED, temperature_start=1e4, temperature_end=1e4, anneal_epochs=1)

VARIANTS: dict[str, Recipe] = {
    "static": replace(TODAY, model="static"),
    "today": TODAY,
    "router-init-linear": replace(TODAY, router_init="linear"),
    "router-init-dyconv": replace(TODAY, router_init="dyconv"),
    "no-router-decay": replace(TODAY, decay="kernels"),
    "anneal-dyconv": replace(TODAY, anneal_epochs=2),
    "no-anneal": replace(TODAY, temperature_start=1.0, anneal_epochs=1),
    "end-temperature-0.3": replace(TODAY, temperature_end=0.3),
    "experts-scaled": replace(TODAY, expert_init="scaled"),
    "experts-shared": replace(TODAY, expert_init="shared"),
    "recommended": RECOMMENDED,
    "uniform-mix": UNIFORM_MIX,
    "affine-static": replace(TODAY, model="static", task="digits-affine"),
    "affine-today": replace(TODAY, task="digits-affine"),
    "affine-recommended": replace(RECOMMENDED, task="digits-affine"),
    "affine-uniform-mix": replace(UNIFORM_MIX, task="digits-affine"),
}


def init_experts(model: nn.Module, scheme: str, generator: torch.Generator | None = None) -> None:
    """Re-initialise every DynamicConv2d bank of ``model`` by ``scheme``:

    - ``"independent"``: each expert like an ``nn.Conv2d`` kernel (the module's own init);
    - ``"scaled"``: independent, times sqrt(K), so the uniform mix (1/K) sum_k W_k starts with the
      variance of one ``nn.Conv2d`` kernel instead of 1/K of it;
    - ``"shared"``: one ``nn.Conv2d``-like kernel copied to every expert plus independent noise
      of 10 % of its standard deviation (experts start as near copies, as when a trained static
      conv is turned into a dynamic one).
    """
    if scheme not in EXPERT_INITS:
        raise ValueError(f"scheme must be one of {EXPERT_INITS}, got {scheme!r}")
    for module in model.modules():
        if not isinstance(module, DynamicConv2d):
            continue
        with torch.no_grad():
            bank = module.weight
            for expert in bank:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5), generator=generator)
            if scheme == "scaled":
                bank.mul_(math.sqrt(bank.shape[0]))
            elif scheme == "shared":
                noise = torch.randn(bank.shape, generator=generator, dtype=bank.dtype)
                bank.copy_(bank[0] + 0.1 * bank[0].std() * noise)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's model, initialised from the current global RNG."""
    if recipe.model == "static":
        return StaticCNN(1, num_classes, recipe.widths)
    model = DynamicCNN(1, num_classes, num_experts=recipe.num_experts, widths=recipe.widths,
                       temperature=recipe.temperature_start)
    for module in model.modules():
        if isinstance(module, RoutingMLP):
            module.reset_parameters(recipe.router_init)
    init_experts(model, recipe.expert_init)
    return model


def run_one(variant: str, recipe: Recipe, seed: int) -> dict:
    """Train one (variant, seed) on the CPU with one thread; returns the final metrics."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = load_digits_split(recipe.image_size, task=recipe.task)
    config = TrainConfig(
        epochs=recipe.epochs, batch_size=recipe.batch_size, optimizer="adamw", lr=recipe.lr,
        weight_decay=recipe.weight_decay, momentum=0.9,
        temperature_start=recipe.temperature_start, temperature_end=recipe.temperature_end,
        anneal_epochs=recipe.anneal_epochs, seed=seed, decay=recipe.decay,
    )
    torch.manual_seed(seed)
    model = build_model(recipe, data.num_classes)
    dynamic = recipe.model == "dynamic"
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = fit(recipe.model, "auto", model, data, config, ctx, dynamic,
                 lambda desc: (lambda loader: loader), lambda text: None)
    last = result.rows[-1]
    record = {"variant": variant, "seed": seed, "recipe": asdict(recipe),
              "test_acc": last["test_acc"], "test_loss": last["test_loss"],
              "seconds": time.perf_counter() - started,
              "curve": [{k: v for k, v in row.items() if k not in ("model", "backend")}
                        for row in result.rows]}
    if dynamic:
        log_k = math.log(recipe.num_experts)
        for stage in range(1, STAGES + 1):
            record[f"entropy_fraction_stage{stage}"] = last[f"entropy_stage{stage}"] / log_k
            record[f"usage_fraction_stage{stage}"] = last[f"usage_entropy_stage{stage}"] / log_k
            bits = last[f"class_information_stage{stage}"] / math.log(2)
            record[f"class_bits_stage{stage}"] = bits
            record[f"expert_distance_stage{stage}"] = last[f"expert_distance_stage{stage}"]
        record["routing_per_class"] = [m.tolist() for m in result.final.routing_per_class]
    return record


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = (
    [("test_acc", "accuracy %", 100.0)]
    + [(f"entropy_fraction_stage{s}", f"H/logK s{s}", 1.0) for s in range(1, STAGES + 1)]
    + [(f"usage_fraction_stage{s}", f"usage/logK s{s}", 1.0) for s in range(1, STAGES + 1)]
    + [(f"class_bits_stage{s}", f"I(class;expert) bits s{s}", 1.0) for s in range(1, STAGES + 1)]
    + [(f"expert_distance_stage{s}", f"expert cos dist s{s}", 1.0) for s in range(1, STAGES + 1)]
)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per variant (in VARIANTS order): seeds and mean / std of every metric."""
    rows = []
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
        chosen = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "seeds": sorted(r["seed"] for r in chosen)}
        for key, _, scale in METRICS:
            values = [r[key] * scale for r in chosen if key in r]
            if values:
                row[key] = mean_spread(values)
        rows.append(row)
    return rows


def _fmt(cell, digits: int) -> str:
    if cell is None:
        return "-"
    mean, spread = cell
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def write_table(rows: list[dict], path_md: Path, path_csv: Path) -> str:
    """The markdown summary (accuracy, then per-stage routing metrics) and a flat CSV."""
    lines = ["| variant | seeds | accuracy % | H / log K (s1, s2, s3) | usage / log K (s1, s2, s3) "
             "| I(class; expert) bits (s1, s2, s3) | expert cosine distance (s1, s2, s3) |",
             "|---|---|---:|---|---|---|---|"]
    def stages(row, prefix, digits):
        cells = [row.get(f"{prefix}_stage{s}") for s in range(1, STAGES + 1)]
        return "-" if cells[0] is None else ", ".join(_fmt(c, digits) for c in cells)

    for row in rows:
        lines.append(
            f"| {row['variant']} | {len(row['seeds'])} | {_fmt(row.get('test_acc'), 2)} "
            f"| {stages(row, 'entropy_fraction', 4)} | {stages(row, 'usage_fraction', 4)} "
            f"| {stages(row, 'class_bits', 3)} | {stages(row, 'expert_distance', 3)} |")
    text = "\n".join(lines) + "\n"
    path_md.write_text(text)
    header = ["variant", "seeds"] + [f"{k}_{part}" for k, _, _ in METRICS
                                     for part in ("mean", "std")]
    csv_lines = [",".join(header)]
    for row in rows:
        cells = [row["variant"], " ".join(map(str, row["seeds"]))]
        for key, _, _ in METRICS:
            mean, spread = row.get(key, (math.nan, math.nan))
            cells += [f"{mean:.6g}", f"{spread:.6g}"]
        csv_lines.append(",".join(cells))
    path_csv.write_text("\n".join(csv_lines) + "\n")
    return text


def plot_summary(rows: list[dict], path: Path) -> None:
    """Accuracy and stage-3 routing metrics per variant, mean with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def on_digits(row):
        return VARIANTS[row["variant"]].task == "digits"

    # (metric, title, which rows): the two tasks' accuracies differ by 50 points: own panels.
    panels = [("test_acc", "test accuracy (%), digits", on_digits),
              ("test_acc", "test accuracy (%), digits-affine", lambda row: not on_digits(row)),
              ("entropy_fraction_stage3", "stage 3: per-image entropy / log K", None),
              ("class_bits_stage3", "stage 3: I(class; expert), bits", None),
              ("expert_distance_stage3", "stage 3: expert cosine distance", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.32 * len(rows) + 1.6),
                             sharey=True)
    labels = [row["variant"] for row in rows]
    for ax, (key, title, keep) in zip(axes, panels, strict=True):
        for y, row in enumerate(rows):
            if key in row and (keep is None or keep(row)):
                mean, spread = row[key]
                color = "grey" if row["variant"].endswith("static") else "C0"
                ax.errorbar(mean, y, xerr=spread, fmt="o", color=color, capsize=3)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Routing ablations (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynconv.train.ablation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override every recipe's epochs (and its anneal, pro rata)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.jsonl"
    done = {(r["variant"], r["seed"]) for r in read_runs(runs_path)}
    todo = []
    for variant in args.variants:
        recipe = VARIANTS[variant]
        if args.epochs is not None:
            anneal = max(1, round(recipe.anneal_epochs * args.epochs / recipe.epochs))
            recipe = replace(recipe, epochs=args.epochs, anneal_epochs=anneal)
        todo += [(variant, recipe, seed) for seed in args.seeds if (variant, seed) not in done]
    print(f"{len(todo)} runs to do, {len(done)} already in {runs_path}", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, *job) for job in todo]
        for future in futures:
            record = future.result()
            with runs_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(f"{record['variant']} seed {record['seed']}: accuracy "
                  f"{100 * record['test_acc']:.2f}% in {record['seconds']:.0f} s", flush=True)
    rows = summarise(read_runs(runs_path))
    text = write_table(rows, args.out / "ablation.md", args.out / "ablation.csv")
    plot_summary(rows, args.out / "ablation.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
