"""What ``dynconv.train`` writes: metrics CSVs, the results table, routing plots, a checkpoint."""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSummary:
    """One row of the results table: a model trained with one or more seeds."""

    model: str
    backend: str
    test_accuracies: list[float]  # final test accuracy per seed
    parameters: int
    multiply_adds: int
    epoch_seconds: list[float]  # every epoch of every seed

    @property
    def median_epoch_seconds(self) -> float:
        return statistics.median(self.epoch_seconds) if self.epoch_seconds else math.nan

    @property
    def accuracy_text(self) -> str:
        """``98.61 ± 0.20% (3 seeds)`` (sample std); ``98.61% ± n/a (1 seed)`` for one."""
        values = [100 * a for a in self.test_accuracies]
        return mean_std_text(values, "%") + f" ({len(values)} seed{'s' * (len(values) > 1)})"


def mean_std_text(values: list[float], unit: str = "", digits: int = 2) -> str:
    """``mean ± sample std`` with its unit; ``mean ± n/a`` for one value (no spread)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit} ± n/a"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}{unit}"


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """One row per (model, backend, epoch); columns are the union of all rows' keys."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                             for k, v in row.items()})


def write_routing_csv(path: Path, routing: dict[str, list[torch.Tensor]]) -> None:
    """Long format: backend, stage, class, expert, mean routing weight (final test pass)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["backend", "stage", "class", "expert", "mean_routing"])
        for backend, stages in routing.items():
            for stage, matrix in enumerate(stages, start=1):
                for label, weights in enumerate(matrix.tolist()):
                    for expert, weight in enumerate(weights):
                        writer.writerow([backend, stage, label, expert, f"{weight:.6f}"])


def format_table(summaries: list[ModelSummary]) -> str:
    """The results as a markdown table."""
    lines = [
        "| model | backend | test accuracy | parameters | multiply-adds / image "
        "| train time / epoch (median) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.model} | {s.backend} | {s.accuracy_text} | {s.parameters:,} "
            f"| {s.multiply_adds / 1e6:.2f} M | {s.median_epoch_seconds:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_routing_per_class(path: Path, stages: list[torch.Tensor], title: str) -> None:
    """One heatmap per dynamic stage: rows = digit class, columns = expert, cell = mean weight.

    Routing weights lie in [0, 1]: one sequential colour scale fixed to [0, 1] for every stage,
    one colour bar (the uniform weight 1/K marked on it); each cell prints its weight.
    """
    plt = _pyplot()
    from matplotlib.colors import Normalize

    num_classes, num_experts = stages[0].shape
    uniform = 1.0 / num_experts
    cmap, norm = plt.get_cmap("viridis"), Normalize(vmin=0.0, vmax=1.0)
    fig, axes = plt.subplots(1, len(stages), figsize=(2.3 * len(stages) + 1.6, 4.8),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for index, (ax, matrix) in enumerate(zip(axes[0], stages, strict=True), start=1):
        image = ax.imshow(matrix.numpy(), cmap=cmap, norm=norm, aspect="auto")
        ax.set_title(f"stage {index}", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_classes))
        if index == 1:
            ax.set_ylabel("digit class")
        for label in range(num_classes):
            for expert in range(num_experts):
                weight = float(matrix[label, expert])
                red, green, blue, _ = cmap(norm(weight))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(expert, label, f"{weight:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    bar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.05, pad=0.02)
    bar.set_label(f"mean routing weight (uniform: 1/K = {uniform:.2f})")
    bar.ax.axhline(uniform, color="red", linewidth=1.5)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing_entropy(path: Path, rows: list[dict], num_experts: int, title: str) -> None:
    """Routing entropy per stage over training, with the router temperature.

    Left: entropy as a fraction of log K (1 = uniform mix, 0 = one expert per image). Right: how
    far the per-image entropy is below uniform, ``log K - H`` in nats on a log scale, which shows
    the departure from uniform even while it is still tiny. Solid: the mean per-image entropy;
    dashed: the entropy of the routing averaged over all test images (low if all images pick the
    same experts); dotted: the temperature (right-hand axis).
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    epochs = [row["epoch"] for row in rows]
    stages = sorted(int(key.removeprefix("entropy_stage")) for key in rows[0]
                    if key.startswith("entropy_stage"))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    uniform = math.log(num_experts)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    deficits = []
    for stage in stages:
        color = f"C{stage - 1}"
        per_image = [row[f"entropy_stage{stage}"] for row in rows]
        usage = [row[f"usage_entropy_stage{stage}"] for row in rows]
        left.plot(epochs, [h / uniform for h in per_image], color=color, marker="o",
                  markersize=3)
        left.plot(epochs, [h / uniform for h in usage], color=color, linestyle="--")
        # Clamped: the deficit can round to 0 or below in float64 when the mix is uniform.
        deficit = [max(uniform - h, 1e-12) for h in per_image]
        deficits += [d for d in deficit if math.isfinite(d)]
        right.plot(epochs, deficit, color=color, marker="o", markersize=3)
    left.set_ylim(0, 1.05)
    left.set_ylabel(f"entropy (fraction of log K = {uniform:.3f} nats)")
    left.set_title("routing entropy (1 = uniform mix, 0 = one expert)", fontsize=9)
    right.set_yscale("log")
    if deficits:  # whole decades, ticks at 1 and 3 per decade: they frame every point
        right.set_ylim(10.0 ** math.floor(math.log10(min(deficits))),
                       10.0 ** math.ceil(math.log10(max(deficits))))
        right.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        right.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        right.yaxis.set_minor_locator(NullLocator())
    right.set_ylabel("log K - per-image entropy (nats)")
    right.set_title("how far the per-image routing is from uniform", fontsize=9)
    stage_handles = [Line2D([], [], color=f"C{s - 1}", marker="o", markersize=3,
                            label=f"stage {s}") for s in stages]
    style_handles = {
        left: [Line2D([], [], color="black", marker="o", markersize=3,
                      label="per image (mean over images)"),
               Line2D([], [], color="black", linestyle="--",
                      label="of the mean routing (expert usage)")],
        right: [],
    }
    for ax in (left, right):
        ax.set_xlabel("epoch (0 = before training)")
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
        twin = ax.twinx()
        twin.plot(epochs, [row["temperature"] for row in rows], color="grey", linestyle=":")
        twin.set_ylabel("router temperature (dotted)")
        temperature = Line2D([], [], color="grey", linestyle=":", label="temperature (right axis)")
        twin.legend(handles=stage_handles + style_handles[ax] + [temperature], fontsize=7,
                    loc="center right", framealpha=0.9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(path: Path, rows: list[dict], title: str) -> None:
    """Test accuracy per epoch of each (model, backend): mean over the seeds in ``rows`` with a
    band of +- one standard deviation (no band, and ``± n/a``, for a single seed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
    runs = {}
    for row in rows:
        runs.setdefault((row["model"], row["backend"]), {}).setdefault(row["epoch"], []).append(
            100 * row["test_acc"])
    for index, ((model, backend), by_epoch) in enumerate(runs.items()):
        epochs = sorted(by_epoch)
        means = [statistics.fmean(by_epoch[e]) for e in epochs]
        label = model if backend == "-" else f"{model} [{backend}]"
        ax.plot(epochs, means, color=f"C{index}", marker="o", markersize=3,
                label=f"{label}: {mean_std_text(by_epoch[epochs[-1]], '%')} after the last epoch")
        if all(len(by_epoch[e]) > 1 for e in epochs):
            spreads = [statistics.stdev(by_epoch[e]) for e in epochs]
            ax.fill_between(epochs, [m - s for m, s in zip(means, spreads, strict=True)],
                            [m + s for m, s in zip(means, spreads, strict=True)],
                            color=f"C{index}", alpha=0.2)
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    _integer_epochs(ax)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_checkpoint(path: Path, run: dict, static: torch.nn.Module,
                    dynamic: dict[str, torch.nn.Module]) -> None:
    """The run's settings and results plus every trained model's state dict, on the CPU."""

    def cpu_state(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    torch.save({"run": run, "static": cpu_state(static),
                "dynamic": {backend: cpu_state(m) for backend, m in dynamic.items()}}, path)


# --- redrawing a finished run's figures from its files (no training) ---------------------------


def _read_metrics(path: Path) -> list[dict]:
    """metrics.csv back into rows as the trainer wrote them (numbers as numbers, blanks NaN)."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                if key in ("model", "backend"):
                    row[key] = value
                elif key in ("seed", "epoch"):
                    row[key] = int(value)
                else:
                    row[key] = float(value) if value != "" else math.nan
            rows.append(row)
    return rows


def _read_routing(path: Path) -> dict[str, list[torch.Tensor]]:
    cells: dict[str, dict[int, dict[tuple[int, int], float]]] = {}
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            stage = cells.setdefault(raw["backend"], {}).setdefault(int(raw["stage"]), {})
            stage[int(raw["class"]), int(raw["expert"])] = float(raw["mean_routing"])
    routing = {}
    for backend, stages in cells.items():
        routing[backend] = []
        for stage in sorted(stages):
            classes = 1 + max(c for c, _ in stages[stage])
            experts = 1 + max(e for _, e in stages[stage])
            routing[backend].append(torch.tensor(
                [[stages[stage][c, e] for e in range(experts)] for c in range(classes)]))
    return routing


def _final_accuracies(rows: list[dict], model: str | None, backend: str) -> list[float]:
    """The last epoch's test accuracy of every seed of one (model, backend)."""
    last: dict[int, tuple[int, float]] = {}
    for row in rows:
        if row["backend"] == backend and (model is None or row["model"] == model):
            if row["seed"] not in last or row["epoch"] > last[row["seed"]][0]:
                last[row["seed"]] = (row["epoch"], row["test_acc"])
    return [accuracy for _, accuracy in last.values()]


def _refresh_accuracy_cells(path: Path, rows: list[dict]) -> None:
    """Rewrite results.md's test-accuracy cells from metrics.csv (``± n/a`` for one seed)."""
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        cells = line.split(" | ")
        if not line.startswith("| ") or len(cells) < 4 or cells[0] == "| model":
            continue
        backend = cells[1]
        model = "static" if backend == "-" else "DynamicCNN"
        values = [100 * a for a in _final_accuracies(rows, model, backend)]
        if values:
            cells[2] = mean_std_text(values, "%") + (
                f" ({len(values)} seed{'s' * (len(values) > 1)})")
            lines[index] = " | ".join(cells)
    path.write_text("\n".join(lines) + "\n")


def redraw(folder: Path) -> list[Path]:
    """Redraw the plots of a finished ``dynconv.train`` run from the files it wrote in
    ``folder`` (metrics.csv, routing_per_class.csv, results.md), as the trainer draws them, and
    refresh results.md's accuracy cells; nothing is trained. Returns the files written."""
    rows = _read_metrics(folder / "metrics.csv")
    results = folder / "results.md"
    settings = results.read_text() if results.exists() else ""
    task = settings.split("\n\n", 1)[-1].split(",", 1)[0].strip() or "digits"
    seeds = sorted({row["seed"] for row in rows})
    match = re.search(r"plots: seed (\d+)", settings)
    plot_seed = int(match.group(1)) if match else seeds[0]
    written = []
    routing_csv = folder / "routing_per_class.csv"
    for backend, stages in (_read_routing(routing_csv) if routing_csv.exists() else {}).items():
        backend_rows = [r for r in rows if r["model"] == "DynamicCNN" and r["backend"] == backend
                        and r["seed"] == plot_seed]
        num_experts = stages[0].shape[1]
        end = backend_rows[-1]["temperature"] if backend_rows else math.nan
        path = folder / f"routing_per_class_{backend}.png"
        plot_routing_per_class(
            path, stages, f"DynamicCNN (K={num_experts}, backend {backend}), seed {plot_seed}: "
            f"mean routing weight per class, test set, T={end:g}")
        written.append(path)
        if backend_rows and "entropy_stage1" in backend_rows[0]:
            path = folder / f"routing_entropy_{backend}.png"
            plot_routing_entropy(path, backend_rows, num_experts,
                                 f"DynamicCNN (backend {backend}), seed {plot_seed}: routing "
                                 f"entropy on the test set")
            written.append(path)
    path = folder / "accuracy.png"
    plot_accuracy(path, rows, f"test accuracy over training ({task}), mean and std over "
                              f"{len(seeds)} seed(s)")
    written.append(path)
    if results.exists():
        _refresh_accuracy_cells(results, rows)
        written.append(results)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m dynconv.train.report FOLDER...``: redraw finished runs' figures."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dynconv.train.report",
        description="Redraw the plots of finished dynconv.train runs from their metrics.csv and "
                    "routing_per_class.csv (and refresh results.md's accuracy cells); no "
                    "training.")
    parser.add_argument("folders", nargs="+", type=Path, help="a run's --out folder")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not (folder / "metrics.csv").is_file():
            parser.error(f"{folder} has no metrics.csv (not a dynconv.train output folder)")
        for path in redraw(folder):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
