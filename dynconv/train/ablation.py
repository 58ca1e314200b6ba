"""Routing ablations: what makes DynamicCNN's routing depend on the input, over several seeds.

    python -m dynconv.train.ablation --out perf_reports/training/ablation   # the quoted set
    python -m dynconv.train.ablation --out DIR --variants today no-router-decay --seeds 0 1 2
    python -m dynconv.train.ablation --check perf_reports/training/ablation  # no training
    # add recipes to a finished set: only the missing (variant, seed) pairs are trained
    python -m dynconv.train.ablation --out DIR --variants odconv affine-odconv

Each *variant* is one full recipe (router initialisation, expert initialisation, which
parameters get weight decay, the temperature schedule, the task); each differs from its base in
one thing: ``today`` (the recipe before the ablation) for the single-change variants,
``recommended`` (the library's and the demo's defaults) for the static twins, the
``uniform-mix`` controls (which hold the routing uniform), the ``odconv`` recipes (the
ODConv model, ``DynamicCNN(conv="odconv")``) and the schedule alternatives on digits-affine.
Every (variant, seed) pair is one run of :func:`dynconv.train.loop.fit` with the demo's budget
(18 epochs, batch 64, AdamW 2e-3, cosine), in its own worker process with one intra-op thread;
``--jobs`` runs several at once. Each finished run appends one JSON line to ``DIR/runs.jsonl``
(a rerun skips the (variant, seed) pairs already there with the same recipe and data set), with
the git commit of the code and the data set's definition. From the runs:

- ``ablation.md`` / ``.csv``: per variant, mean ± 95 % confidence interval (Student t over the
  seeds) and the standard deviation of the test accuracy and of every routing metric: per
  dynamic stage the mean per-image routing entropy / log K (1 = uniform), the usage entropy (of
  the mean routing) / log K, I(class; expert) (bits), the expert cosine distance, the share of
  the routing's variance explained by class, by brightness and contrast and (digits-affine) by
  the transform parameters, and the accuracy with each image's routing replaced by its batch's
  mean (:mod:`dynconv.train.diagnostics`);
- ``comparisons.md``: the differences the project README quotes, with Welch 95 % intervals and
  p-values, and ``quoted.md``, the README's table;
- ``ablation.png`` and, for seed 0 of each task's ``recommended``, the per-class routing
  heatmap and the routing entropy over training.

``--check`` recomputes every table from ``runs.jsonl`` and fails when a file differs, a run
lacks its commit, or a run's recipe or data set is not what the code now defines (stale).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from dynconv.modules import DynamicCNN, DynamicConv2d
from dynconv.routing import RoutingMLP

from .data import FACTORS, dataset_definition, load_digits_split
from .diagnostics import routing_diagnostics
from .dist import DistContext
from .loop import TrainConfig, fit
from .models import StaticCNN

EXPERT_INITS = ("independent", "scaled", "shared")
STAGES = 3
# The per-epoch curve is evaluated every EVAL_EVERY epochs (and after the last): evaluation
# consumes no randomness, so the final numbers are those of an every-epoch curve.
EVAL_EVERY = 2


@dataclass(frozen=True)
class Recipe:
    """Everything one ablation run varies; the rest is the demo's defaults."""

    model: str = "dynamic"  # "static": the twin with nn.Conv2d; "odconv": DynamicCNN of ODConv2d
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
# The static twin, trained as the demo trains it (decay by dynconv.param_groups, as RECOMMENDED).
STATIC = replace(RECOMMENDED, model="static")
# The recommended recipe with ODConv2d in place of DynamicConv2d (DynamicCNN(conv="odconv")): its
# own router (four attentions, hidden max(Cin / 16, 16)) and initialisation (the paper's:
# Kaiming normal fan_out, as router_init="dyconv"); the same schedule, reaching all four heads.
ODCONV = replace(RECOMMENDED, model="odconv")

VARIANTS: dict[str, Recipe] = {
    "static": STATIC,
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
    "odconv": ODCONV,
    "affine-static": replace(STATIC, task="digits-affine"),
    "affine-today": replace(TODAY, task="digits-affine"),
    "affine-recommended": replace(RECOMMENDED, task="digits-affine"),
    "affine-uniform-mix": replace(UNIFORM_MIX, task="digits-affine"),
    "affine-odconv": replace(ODCONV, task="digits-affine"),
    # The temperature schedule's alternatives, with the recommended recipe on digits-affine.
    "affine-recommended-anneal-dyconv": replace(RECOMMENDED, task="digits-affine",
                                                anneal_epochs=2),
    "affine-recommended-no-anneal": replace(RECOMMENDED, task="digits-affine",
                                            temperature_start=1.0, anneal_epochs=1),
    "affine-recommended-end-temperature-0.3": replace(RECOMMENDED, task="digits-affine",
                                                      temperature_end=0.3),
}
# What the project README quotes, each over SEEDS (--check insists on all of them).
QUOTED = ("static", "recommended", "uniform-mix", "odconv", "affine-static",
          "affine-recommended", "affine-uniform-mix", "affine-odconv")
# The temperature schedule's alternatives: run after the quoted variants (by default and by
# ``make training-figures``), reported here, quoted only once they have every seed.
SCHEDULE_VARIANTS = ("affine-recommended-anneal-dyconv", "affine-recommended-no-anneal",
                     "affine-recommended-end-temperature-0.3")
SEEDS = tuple(range(8))
# The differences the README quotes: (what, better, baseline).
COMPARISONS = (
    ("input-dependent routing, digits", "recommended", "uniform-mix"),
    ("K averaged kernels, digits", "uniform-mix", "static"),
    ("dynamic over static, digits", "recommended", "static"),
    ("ODConv over DynamicConv, digits", "odconv", "recommended"),
    ("ODConv over static, digits", "odconv", "static"),
    ("input-dependent routing, digits-affine", "affine-recommended", "affine-uniform-mix"),
    ("K averaged kernels, digits-affine", "affine-uniform-mix", "affine-static"),
    ("dynamic over static, digits-affine", "affine-recommended", "affine-static"),
    ("ODConv over DynamicConv, digits-affine", "affine-odconv", "affine-recommended"),
    ("ODConv over static, digits-affine", "affine-odconv", "affine-static"),
    ("anneal over 2 epochs instead of 6, digits-affine", "affine-recommended-anneal-dyconv",
     "affine-recommended"),
    ("no anneal (T = 1) instead of 30 -> 1, digits-affine", "affine-recommended-no-anneal",
     "affine-recommended"),
    ("end temperature 0.3 instead of 1, digits-affine",
     "affine-recommended-end-temperature-0.3", "affine-recommended"),
)


def init_experts(model: nn.Module, scheme: str, generator: torch.Generator | None = None) -> None:
    """Re-initialise every DynamicConv2d bank of ``model`` by ``scheme`` (an ODConv2d's bank keeps
    ODConv's own initialisation, drawn when the model was built):

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
    if recipe.model == "odconv":
        if recipe.router_init != "dyconv" or recipe.expert_init != "independent":
            raise ValueError("an ODConv recipe keeps ODConv's own router and expert "
                             "initialisation (router_init='dyconv', expert_init='independent')")
        return DynamicCNN(1, num_classes, num_experts=recipe.num_experts, widths=recipe.widths,
                          temperature=recipe.temperature_start, conv="odconv")
    model = DynamicCNN(1, num_classes, num_experts=recipe.num_experts, widths=recipe.widths,
                       temperature=recipe.temperature_start)
    for module in model.modules():
        if isinstance(module, RoutingMLP):
            module.reset_parameters(recipe.router_init)
    init_experts(model, recipe.expert_init)
    return model


def provenance() -> dict:
    """The git commit of this checkout and its modified tracked files under ``dynconv/`` (a
    result made with uncommitted changes says so); ``commit`` is "unknown" outside git."""
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "dynconv")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "uncommitted": []}
    return {"commit": commit,
            "uncommitted": [line[3:] for line in changed.splitlines() if line.strip()]}


def run_one(variant: str, recipe: Recipe, seed: int, source: dict | None = None) -> dict:
    """Train one (variant, seed) on the CPU with one thread; returns the final metrics, the
    routing diagnostics, the data set's definition and ``source`` (default: :func:`provenance`)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = load_digits_split(recipe.image_size, task=recipe.task)
    config = TrainConfig(
        epochs=recipe.epochs, batch_size=recipe.batch_size, optimizer="adamw", lr=recipe.lr,
        weight_decay=recipe.weight_decay, momentum=0.9,
        temperature_start=recipe.temperature_start, temperature_end=recipe.temperature_end,
        anneal_epochs=recipe.anneal_epochs, seed=seed, decay=recipe.decay,
        eval_every=EVAL_EVERY,
    )
    torch.manual_seed(seed)
    model = build_model(recipe, data.num_classes)
    dynamic = recipe.model != "static"
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = fit(recipe.model, "auto", model, data, config, ctx, dynamic,
                 lambda desc: (lambda loader: loader), lambda text: None)
    last = result.rows[-1]
    record = {"variant": variant, "seed": seed, "recipe": asdict(recipe),
              "dataset": dataset_definition(recipe.task, recipe.image_size),
              **(source if source is not None else provenance()),
              "torch": str(torch.__version__), "test_images": len(data.test_y),
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
        diagnostics = routing_diagnostics(model, data, config.eval_batch_size)
        record.update(diagnostics)
        record["seconds"] = time.perf_counter() - started
    return record


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def interval_half_width(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean of ``values`` (Student t; NaN for
    fewer than two values)."""
    if len(values) < 2:
        return math.nan
    return t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def welch(better: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Difference of the means, half-width of its 95 % interval and the two-sided p-value
    (Welch's unequal-variance t test)."""
    from scipy.stats import t

    mean_a, mean_b = statistics.fmean(better), statistics.fmean(baseline)
    var_a = statistics.variance(better) / len(better)
    var_b = statistics.variance(baseline) / len(baseline)
    error = math.sqrt(var_a + var_b)
    difference = mean_a - mean_b
    if error == 0:
        return difference, 0.0, (1.0 if difference == 0 else 0.0)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(better) - 1) + var_b**2 / (len(baseline) - 1))
    p_value = 2 * float(t.sf(abs(difference) / error, df))
    return difference, t_quantile(df) * error, p_value


def paired(values: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences, half-width of its 95 % interval and the two-sided p-value
    (paired t test)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    error = statistics.stdev(values) / math.sqrt(len(values))
    if error == 0:
        return mean, 0.0, (1.0 if mean == 0 else 0.0)
    return mean, t_quantile(len(values) - 1) * error, 2 * float(t.sf(abs(mean) / error,
                                                                   len(values) - 1))


def _stage_metrics(prefix: str, label: str, scale: float = 1.0):
    return [(f"{prefix}_stage{s}", f"{label} s{s}", scale) for s in range(1, STAGES + 1)]


R2_VARIABLES = ("class", "brightness", "contrast", "brightness_contrast", "all_transforms",
                *FACTORS)
METRICS = (
    [("test_acc", "accuracy %", 100.0), ("mean_routing_acc", "mean-routing accuracy %", 100.0),
     ("mean_attention_acc", "mean-attention accuracy % (ODConv: all four)", 100.0)]
    + _stage_metrics("mean_routing_acc", "mean-routing accuracy %", 100.0)
    + _stage_metrics("entropy_fraction", "H/logK")
    + _stage_metrics("usage_fraction", "usage/logK")
    + _stage_metrics("class_bits", "I(class;expert) bits")
    + _stage_metrics("image_bits", "I(image;expert) bits")
    + _stage_metrics("expert_distance", "expert cos dist")
    + [m for name in R2_VARIABLES for m in _stage_metrics(f"r2_{name}", f"R2 {name}")]
)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per variant (in VARIANTS order): seeds, commits, and per metric (mean, sample
    std) under the metric's key and the 95 % interval's half-width under ``interval``."""
    rows = []
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
        chosen = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "seeds": sorted(r["seed"] for r in chosen),
               "commits": sorted({r.get("commit", "unknown") for r in chosen}),
               "interval": {}}
        for key, _, scale in METRICS:
            values = [r[key] * scale for r in chosen if key in r]
            if key.startswith("image_bits_stage"):
                values = [image_bits(r, int(key[-1])) for r in chosen
                          if f"usage_fraction_stage{key[-1]}" in r]
            if values:
                row[key] = mean_spread(values)
                row["interval"][key] = interval_half_width(values)
        rows.append(row)
    return rows


def image_bits(run: dict, stage: int) -> float:
    """I(image; expert) in bits at ``stage``: the usage entropy minus the mean per-image entropy
    (how much an expert drawn from an image's routing tells about which image it was; 0 when
    every image is routed alike, whatever its class)."""
    log2_k = math.log2(run["recipe"]["num_experts"])
    return (run[f"usage_fraction_stage{stage}"] - run[f"entropy_fraction_stage{stage}"]) * log2_k


def _fmt(cell, digits: int) -> str:
    if cell is None:
        return "-"
    mean, spread = cell
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _ci(row: dict, key: str, digits: int) -> str:
    """``mean ± half-width`` of the 95 % interval (``mean`` alone for one seed)."""
    if key not in row:
        return "-"
    mean, half = row[key][0], row["interval"].get(key, math.nan)
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _provenance_line(rows: list[dict]) -> str:
    commits = sorted({c for row in rows for c in row["commits"]})
    return ("Runs made at commit " + ", ".join(c[:12] for c in commits)
            + " (each run's commit, data set and recipe are in runs.jsonl).")


def render_table(rows: list[dict]) -> str:
    """``ablation.md``: accuracy, routing statistics and variance explained, mean ± 95 %
    interval over each variant's seeds."""
    def stages(row, prefix, digits):
        if f"{prefix}_stage1" not in row:
            return "-"
        return ", ".join(_ci(row, f"{prefix}_stage{s}", digits) for s in range(1, STAGES + 1))

    lines = [_provenance_line(rows), "",
             "Mean ± half-width of the 95 % confidence interval of the mean over the seeds "
             "(Student t); std: the seeds' sample standard deviation.", "",
             "| variant | seeds | accuracy % | std | accuracy % with mean routing, all stages "
             "| ... only stage 1, 2, 3 |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        spread = f"{row['test_acc'][1]:.2f}" if "test_acc" in row else "-"
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | {_ci(row, 'test_acc', 2)} "
                     f"| {spread} | {_ci(row, 'mean_routing_acc', 2)} "
                     f"| {stages(row, 'mean_routing_acc', 2)} |")
    odconv = [row for row in rows if "mean_attention_acc" in row]
    if odconv:
        lines += ["", "ODConv models: the routing above is ODConv's kernel attention (the softmax "
                  "over the K experts); its three other attentions (input channels, output "
                  "channels, taps) stay per image under mean routing. With all four attentions "
                  "of every stage at their batch means:", "",
                  "| variant | seeds | accuracy % | accuracy % with mean routing "
                  "| accuracy % with all four attentions at the batch mean |",
                  "|---|---:|---:|---:|---:|"]
        for row in odconv:
            lines.append(f"| {row['variant']} | {len(row['seeds'])} | {_ci(row, 'test_acc', 2)} "
                         f"| {_ci(row, 'mean_routing_acc', 2)} "
                         f"| {_ci(row, 'mean_attention_acc', 2)} |")
    lines += ["", "Per dynamic stage (s1, s2, s3):", "",
              "| variant | H / log K | usage / log K | I(image; expert) bits "
              "| I(class; expert) bits | expert cosine distance |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "entropy_fraction_stage1" not in row:
            continue
        lines.append(f"| {row['variant']} | {stages(row, 'entropy_fraction', 3)} "
                     f"| {stages(row, 'usage_fraction', 3)} | {stages(row, 'image_bits', 3)} "
                     f"| {stages(row, 'class_bits', 3)} | {stages(row, 'expert_distance', 3)} |")
    lines += ["", "Share of the routing's variance between test images (R²) explained, per stage "
              "(s1, s2, s3); not for the uniform-mix controls, whose routing varies by less than "
              "1e-3 (a share of that means nothing):", "",
              "| variant | " + " | ".join(R2_VARIABLES) + " |",
              "|---|" + "---|" * len(R2_VARIABLES)]
    for row in rows:
        if "r2_class_stage1" not in row or "uniform-mix" in row["variant"]:
            continue
        lines.append(f"| {row['variant']} | "
                     + " | ".join(stages(row, f"r2_{name}", 2) for name in R2_VARIABLES) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict]) -> str:
    header = ["variant", "seeds", "commits"] + [f"{k}_{part}" for k, _, _ in METRICS
                                                for part in ("mean", "std", "ci95")]
    lines = [",".join(header)]
    for row in rows:
        cells = [row["variant"], " ".join(map(str, row["seeds"])),
                 " ".join(c[:12] for c in row["commits"])]
        for key, _, _ in METRICS:
            mean, spread = row.get(key, (math.nan, math.nan))
            cells += [f"{mean:.6g}", f"{spread:.6g}",
                      f"{row['interval'].get(key, math.nan):.6g}"]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], path_md: Path, path_csv: Path) -> str:
    """Write :func:`render_table` and :func:`render_csv`; returns the markdown."""
    text = render_table(rows)
    path_md.write_text(text)
    path_csv.write_text(render_csv(rows))
    return text


def _accuracies(runs: list[dict], variant: str) -> list[float]:
    return [100 * r["test_acc"] for r in runs if r["variant"] == variant]


def render_comparisons(runs: list[dict]) -> str:
    """``comparisons.md``: each of COMPARISONS with both variants run, as a difference of mean
    test accuracy with its Welch 95 % interval and p-value."""
    lines = [_provenance_line(summarise(runs)), "",
             "Difference of mean test accuracy (points), Welch 95 % interval and two-sided "
             "p-value; n = seeds per side.", "",
             "| comparison | variant | baseline | n | difference | 95 % interval | p |",
             "|---|---|---|---:|---:|---|---:|"]
    for what, better, baseline in COMPARISONS:
        a, b = _accuracies(runs, better), _accuracies(runs, baseline)
        if len(a) < 2 or len(b) < 2:
            continue
        difference, half, p_value = welch(a, b)
        lines.append(f"| {what} | {better} | {baseline} | {len(a)} / {len(b)} "
                     f"| {difference:+.2f} | {difference - half:+.2f} to {difference + half:+.2f} "
                     f"| {p_value:.2g} |")
    lines += ["", "The same trained models with each image's routing replaced by its batch's mean "
              "(every stage): accuracy lost, paired over the seeds (paired t interval and p).", "",
              "| variant | n | accuracy lost (points) | 95 % interval | p |",
              "|---|---:|---:|---|---:|"]
    for variant, key in MEAN_ROUTING_LOSSES:
        lost = [100 * (r["test_acc"] - r[key]) for r in runs
                if r["variant"] == variant and key in r]
        if len(lost) < 2:
            continue
        mean, half, p_value = paired(lost)
        label = variant + (" (all four attentions)" if key == "mean_attention_acc" else "")
        lines.append(f"| {label} | {len(lost)} | {mean:+.2f} | {mean - half:+.2f} to "
                     f"{mean + half:+.2f} | {p_value:.2g} |")
    return "\n".join(lines) + "\n"


QUOTED_LABELS = {
    "static": "static twin (nn.Conv2d)",
    "recommended": "DynamicCNN, the defaults",
    "uniform-mix": "DynamicCNN, routing held uniform (control)",
    "odconv": "DynamicCNN of ODConv2d, the defaults' recipe",
}
# The accuracy lost with mean routing (paired over the seeds): (variant, the metric with it);
# for an ODConv model the kernel attention alone, then all four attentions.
MEAN_ROUTING_LOSSES = (
    ("recommended", "mean_routing_acc"), ("affine-recommended", "mean_routing_acc"),
    ("odconv", "mean_routing_acc"), ("affine-odconv", "mean_routing_acc"),
    ("odconv", "mean_attention_acc"), ("affine-odconv", "mean_attention_acc"),
)


def render_quoted(runs: list[dict]) -> str:
    """``quoted.md``: the tables the project README quotes, from QUOTED's runs."""
    rows = {row["variant"]: row for row in summarise(runs)}

    def seeds(variant):
        return len(rows[variant]["seeds"]) if variant in rows else 0

    lines = [_provenance_line(list(rows.values())), "",
             "| model (recipe) | seeds | digits | digits, mean routing | digits-affine "
             "| digits-affine, mean routing |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant, label in QUOTED_LABELS.items():
        affine = f"affine-{variant}"
        lines.append(f"| {label} | {seeds(variant)} / {seeds(affine)} "
                     f"| {_ci(rows.get(variant, {}), 'test_acc', 2)} "
                     f"| {_ci(rows.get(variant, {}), 'mean_routing_acc', 2)} "
                     f"| {_ci(rows.get(affine, {}), 'test_acc', 2)} "
                     f"| {_ci(rows.get(affine, {}), 'mean_routing_acc', 2)} |")
    lines += ["", "| difference in test accuracy (points) | seeds | mean | 95 % interval | p |",
              "|---|---:|---:|---|---:|"]
    for what, better, baseline in COMPARISONS:
        a, b = _accuracies(runs, better), _accuracies(runs, baseline)
        every_seed = min(len(a), len(b)) >= len(SEEDS)  # a schedule's: only with every seed
        if (better in QUOTED and baseline in QUOTED or every_seed) and min(len(a), len(b)) > 1:
            difference, half, p_value = welch(a, b)
            lines.append(f"| {what} | {len(a)} / {len(b)} | {difference:+.2f} "
                         f"| {difference - half:+.2f} to {difference + half:+.2f} "
                         f"| {p_value:.2g} |")
    for variant, key in MEAN_ROUTING_LOSSES:
        task = VARIANTS[variant].task
        lost = [100 * (r[key] - r["test_acc"]) for r in runs
                if r["variant"] == variant and key in r]
        if len(lost) > 1:
            mean, half, p_value = paired(lost)
            what = ("mean routing instead of each image's" if variant.endswith("recommended")
                    else "ODConv, mean kernel attention" if key == "mean_routing_acc"
                    else "ODConv, all four attentions at their batch mean")
            lines.append(f"| {what}, {task} (same models, paired) "
                         f"| {len(lost)} | {mean:+.2f} | {mean - half:+.2f} to {mean + half:+.2f} "
                         f"| {p_value:.2g} |")
    schedules = (("affine-recommended-anneal-dyconv", "T 30 -> 1 over 2 epochs"),
                 ("affine-recommended-no-anneal", "T = 1 throughout"),
                 ("affine-recommended-end-temperature-0.3", "T 30 -> 0.3"))
    if all(seeds(variant) >= len(SEEDS) for variant, _ in schedules):
        lines += ["", "| digits-affine, defaults but | seeds | accuracy |", "|---|---:|---:|"]
        for variant, label in schedules:
            accuracy = _ci(rows.get(variant, {}), "test_acc", 2)
            lines.append(f"| {label} | {seeds(variant)} | {accuracy} |")
    lines += ["", "| routing of the defaults, per stage (s1, s2, s3) | digits | digits-affine |",
              "|---|---|---|"]
    for key, label, digits in (("image_bits", "I(image; expert), bits", 3),
                               ("r2_class", "R² by class", 2),
                               ("r2_brightness_contrast", "R² by brightness and contrast", 2),
                               ("r2_all_transforms", "R² by the six transform parameters", 2),
                               ("class_bits", "I(class; expert), bits", 3),
                               ("entropy_fraction", "per-image entropy / log K", 3)):
        cells = []
        for variant in ("recommended", "affine-recommended"):
            row = rows.get(variant, {})
            cells.append("-" if f"{key}_stage1" not in row else ", ".join(
                _ci(row, f"{key}_stage{s}", digits) for s in range(1, STAGES + 1)))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _json_form(value):
    return json.loads(json.dumps(value))


def stale_runs(runs: list[dict]) -> list[str]:
    """Why each run (if any) is not what the current code would produce: no commit, or a recipe
    or data set that the code no longer defines under its variant's name."""
    problems = []
    for run in runs:
        name = f"{run.get('variant')} seed {run.get('seed')}"
        if run.get("commit", "unknown") == "unknown":
            problems.append(f"{name}: no commit recorded")
        recipe = VARIANTS.get(run.get("variant"))
        if recipe is None or run.get("recipe") != _json_form(asdict(recipe)):
            problems.append(f"{name}: its recipe is not the variant's current one")
            continue
        if run.get("dataset") != _json_form(dataset_definition(recipe.task, recipe.image_size)):
            problems.append(f"{name}: its data set is not the current {recipe.task}")
    return problems


def render_all(runs: list[dict]) -> dict[str, str]:
    """Every table file of an output folder, by name, from its runs."""
    rows = summarise(runs)
    return {"ablation.md": render_table(rows), "ablation.csv": render_csv(rows),
            "comparisons.md": render_comparisons(runs), "quoted.md": render_quoted(runs)}


def check(out: Path, variants=QUOTED, min_seeds: int = len(SEEDS)) -> list[str]:
    """What is wrong with the committed results in ``out`` (empty: nothing): stale runs (see
    :func:`stale_runs`), a quoted variant with fewer than ``min_seeds`` seeds, or a table file
    that does not match what ``runs.jsonl`` gives. Trains nothing."""
    runs = read_runs(out / "runs.jsonl")
    problems = stale_runs(runs)
    for variant in variants:
        seeds = {r["seed"] for r in runs if r["variant"] == variant}
        if len(seeds) < min_seeds:
            problems.append(f"{variant}: {len(seeds)} seeds, fewer than {min_seeds}")
    for name, text in render_all(runs).items():
        path = out / name
        if not path.exists() or path.read_text() != text:
            problems.append(f"{path} does not match runs.jsonl: rerun the ablation (it rewrites "
                            "the tables without training what is done)")
    return problems


def render_reproduction(committed: list[dict], rerun: list[dict]) -> str:
    """How a rerun (``rerun``'s runs, e.g. at a later commit) compares with the committed
    figures: per quoted variant, the committed mean ± 95 % interval, the rerun's mean over its
    seeds, whether it falls within the interval (a rerun's mean of 8 seeds does so about 9 times
    in 10 when nothing changed), the Welch p-value of the two sets' difference, and how many seeds
    came out bit-identical."""
    def commits(runs):
        return ", ".join(sorted({r.get("commit", "unknown")[:12] for r in runs}))

    lines = [f"Committed runs: commit {commits(committed)}; rerun: commit {commits(rerun)}.", "",
             "| variant | committed accuracy % | rerun mean % | seeds | within the interval "
             "| p (Welch) | seeds identical |", "|---|---:|---:|---:|---|---:|---:|"]
    rows = {row["variant"]: row for row in summarise(committed)}
    for variant in QUOTED:
        again = {r["seed"]: r["test_acc"] for r in rerun if r["variant"] == variant}
        if variant not in rows or not again:
            continue
        before = {r["seed"]: r["test_acc"] for r in committed if r["variant"] == variant}
        mean, half = rows[variant]["test_acc"][0], rows[variant]["interval"]["test_acc"]
        rerun_mean = 100 * statistics.fmean(again.values())
        same = sum(before.get(seed) == value for seed, value in again.items())
        p_value = (welch([100 * a for a in again.values()], [100 * b for b in before.values()])[2]
                   if len(again) > 1 else math.nan)
        lines.append(f"| {variant} | {_ci(rows[variant], 'test_acc', 2)} | {rerun_mean:.2f} "
                     f"| {len(again)} | {'yes' if abs(rerun_mean - mean) <= half else 'no'} "
                     f"| {p_value:.2g} | {same} of {len(again)} |")
    return "\n".join(lines) + "\n"


# The variants whose seed 0's routing is plotted (an ODConv model's: its kernel attention).
ROUTING_PLOTS = ("recommended", "affine-recommended", "odconv", "affine-odconv")


def plot_routing_of(runs: list[dict], variant: str, seed: int, out: Path) -> None:
    """The per-class routing heatmap and the routing entropy over training of one run, with the
    demo's plots (``routing_per_class_<variant>_seed<seed>.png``, ``routing_entropy_...``)."""
    from .report import plot_routing_entropy, plot_routing_per_class

    chosen = [r for r in runs if r["variant"] == variant and r["seed"] == seed]
    if not chosen or "routing_per_class" not in chosen[0]:
        return
    run = chosen[0]
    recipe = VARIANTS[variant]
    stages = [torch.tensor(matrix) for matrix in run["routing_per_class"]]
    kernel = " (kernel attention)" if recipe.model == "odconv" else ""
    plot_routing_per_class(
        out / f"routing_per_class_{variant}_seed{seed}.png", stages,
        f"{variant} ({recipe.task}), seed {seed}: mean routing weight{kernel} per class, test "
        f"set, T={recipe.temperature_end:g}")
    plot_routing_entropy(
        out / f"routing_entropy_{variant}_seed{seed}.png", run["curve"], recipe.num_experts,
        f"{variant} ({recipe.task}), seed {seed}: routing entropy{kernel} on the test set")


MODEL_COLORS = {"dynamic": "C0", "odconv": "C1", "static": "grey"}


def plot_summary(rows: list[dict], path: Path) -> None:
    """Accuracy and stage-3 routing metrics per variant: the mean over the seeds with a bar of
    its 95 % interval (Student t, the interval the tables quote; a variant with one seed: a
    hollow marker, no bar, since its spread is unknown). Static twins grey, dynamic models
    blue, ODConv models orange; one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    def on_digits(row):
        return VARIANTS[row["variant"]].task == "digits"

    # (metric, title, which rows): the two tasks' accuracies differ by 50 points: own panels.
    # (metric, title, which rows, the values' range): the two tasks' accuracies differ by 50
    # points: own panels.
    panels = [("test_acc", "test accuracy on digits (%)", on_digits, (0, 100)),
              ("test_acc", "test accuracy on digits-affine (%)", lambda row: not on_digits(row),
               (0, 100)),
              ("entropy_fraction_stage3",
               "stage 3: per-image routing entropy\n(fraction of log K; 1 = uniform mix)", None,
               (0, 1)),
              ("class_bits_stage3",
               "stage 3: information the expert gives\nabout the class, I(class; expert) (bits)",
               None, (0, None)),
              ("expert_distance_stage3",
               "stage 3: mean cosine distance\nbetween the experts' kernels", None, (0, 2))]
    with plt.rc_context({"axes.autolimit_mode": "round_numbers"}):  # ticks frame the data
        fig, axes = plt.subplots(1, len(panels), sharey=True, layout="constrained",
                                 figsize=(3.6 * len(panels), 0.32 * len(rows) + 2.2))
        labels = [row["variant"] for row in rows]
        for ax, (key, title, keep, (low, high)) in zip(axes, panels, strict=True):
            for y, row in enumerate(rows):
                if key in row and (keep is None or keep(row)):
                    mean = row[key][0]
                    color = MODEL_COLORS[VARIANTS[row["variant"]].model]
                    if len(row["seeds"]) > 1:
                        ax.errorbar(mean, y, xerr=row["interval"][key], fmt="o", color=color,
                                    capsize=3)
                    else:
                        ax.plot(mean, y, "o", markerfacecolor="white", color=color)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            # round limits (ticks at both ends), but not past what the metric can take
            left, right = ax.get_xlim()
            pad = 0.02 * (right - left)
            ax.set_xlim(left if low is None else max(left, low - pad),
                        right if high is None else min(right, high + pad))
        axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
        axes[0].set_ylim(len(labels) - 0.5, -0.5)
    legend = [Line2D([], [], marker="o", linestyle="", color="C0", label="dynamic model"),
              Line2D([], [], marker="o", linestyle="", color=MODEL_COLORS["odconv"],
                     label="dynamic model of ODConv2d"),
              Line2D([], [], marker="o", linestyle="", color="grey",
                     label="static twin (nn.Conv2d)"),
              Line2D([], [], marker="|", markersize=10, linestyle="-", color="black",
                     label="95 % interval of the mean over the seeds (Student t)")]
    if any(len(row["seeds"]) == 1 for row in rows):
        legend.append(Line2D([], [], marker="o", linestyle="", color="black",
                             markerfacecolor="white", label="one seed: ± n/a"))
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8,
               frameon=False)
    seeds = sorted({len(row["seeds"]) for row in rows})
    fig.suptitle(f"Routing ablations: mean over {'/'.join(map(str, seeds))} seeds per recipe",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _todo(variants: list[str], args, done: set) -> list[tuple[str, Recipe, int]]:
    todo = []
    for seed in args.seeds:
        for variant in variants:
            recipe = VARIANTS[variant]
            if args.epochs is not None:
                anneal = max(1, round(recipe.anneal_epochs * args.epochs / recipe.epochs))
                recipe = replace(recipe, epochs=args.epochs, anneal_epochs=anneal)
            if (variant, seed) not in done:
                todo.append((variant, recipe, seed))
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynconv.train.ablation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--check", type=Path, metavar="DIR",
                        help="train nothing: check DIR's committed results against its "
                             "runs.jsonl and the current code (exit 1 on a problem)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(QUOTED + SCHEDULE_VARIANTS),
                        help="default: the ones the README quotes, then the schedule's "
                             "alternatives")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override every recipe's epochs (and its anneal, pro rata)")
    parser.add_argument("--rerun", action="store_true",
                        help="train every run again, replacing runs.jsonl")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="train nothing: print how DIR/runs.jsonl (a rerun) compares with "
                             "--out's committed figures")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: rewrite the tables and figures from runs.jsonl")
    args = parser.parse_args(argv)
    if args.check is not None:
        problems = check(args.check)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) in {args.check}")
        return 1 if problems else 0
    if args.out is None:
        parser.error("--out or --check is required")
    if args.compare is not None:
        print(render_reproduction(read_runs(args.out / "runs.jsonl"),
                                  read_runs(args.compare / "runs.jsonl")), end="")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.jsonl"
    if args.rerun and runs_path.exists():
        runs_path.unlink()
    runs = read_runs(runs_path)
    stale = stale_runs(runs) if args.epochs is None else []
    if stale:
        parser.error(f"{runs_path} holds runs the current code does not define ("
                     f"{'; '.join(stale[:3])}...): use --rerun, or move the file away")
    done = {(r["variant"], r["seed"]) for r in runs}
    # The quoted variants first; each group seed-major, so that an interrupted run set leaves
    # its variants with as many seeds each.
    todo = []
    quoted = [v for v in args.variants if v in QUOTED and not args.render]
    others = [v for v in args.variants if v not in QUOTED and not args.render]
    for group in (quoted, others):
        todo += _todo(group, args, done)
    source = provenance()
    print(f"{len(todo)} runs to do, {len(done)} already in {runs_path}; code at "
          f"{source['commit'][:12]}" + (f", uncommitted: {source['uncommitted']}"
                                        if source["uncommitted"] else ""), flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, *job, source) for job in todo]
        for future in as_completed(futures):
            record = future.result()
            with runs_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(f"{record['variant']} seed {record['seed']}: accuracy "
                  f"{100 * record['test_acc']:.2f}% in {record['seconds']:.0f} s", flush=True)
    runs = read_runs(runs_path)
    for name, text in render_all(runs).items():
        (args.out / name).write_text(text)
    plot_summary(summarise(runs), args.out / "ablation.png")
    for variant in ROUTING_PLOTS:
        plot_routing_of(runs, variant, 0, args.out)
    print((args.out / "ablation.md").read_text())
    print((args.out / "comparisons.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
