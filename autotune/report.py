"""``python -m dynconv.autotune report``: turn bench CSVs into PNG plots and a ``summary.md``.

Each ``bench_<preset>.csv`` found (files given, or searched for under folders given) is
rendered into its own folder (or ``--out/<device>/``) as:

- ``<preset>_throughput_vs_batch.png``: samples/s vs batch, one line per provider, the static
  conv dashed as the reference, one panel per mode;
- ``<preset>_ratio_by_layer.png``: time / static-conv time per layer shape, bars per provider;
- ``<preset>_memory_vs_batch.png``: peak memory above the inputs vs batch (forward+backward);
- ``<preset>_ratio_vs_axis.png``: ratio to static along each other swept axis (K, width,
  spatial size, dtype/layout);
- ``summary.md``: the run's device and versions, and the figures behind the plots as tables.

Plots whose group is absent from a CSV are not drawn.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys

import pandas as pd

from .bench import COLUMNS, MODES, PROVIDERS, RENAMED_PROVIDERS

REQUIRED = {"device_slug", "preset", "group", "shape", "batch", "provider", "mode", "status",
            "time_ms", "ratio_to_static"}
COLORS = {"static": "black", "loop": "tab:red", "grouped": "tab:orange", "auto": "tab:blue",
          "native": "tab:purple", "triton": "tab:green"}
AXIS_GROUPS = (("experts", "experts", "K (kernels in the bank)"),
               ("width", "cin", "channels (Cin = Cout)"),
               ("spatial", "h", "spatial size (H = W)"),
               ("dtype", "variant", "dtype / layout"))


def find_csvs(paths: list[str]) -> list[str]:
    """Bench CSVs among ``paths`` (files as given; folders searched for ``bench_*.csv``)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(glob.glob(os.path.join(path, "**", "bench_*.csv"), recursive=True))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"report: no such file or folder: {path!r}")
    return found


def load(path: str) -> pd.DataFrame:
    """Read one bench CSV; ValueError naming the missing columns if it is not one. Providers
    written under an older name (``dynconv`` for ``auto``) are read under the current one."""
    frame = pd.read_csv(path, keep_default_na=True)
    missing = REQUIRED - set(frame.columns)
    if missing:
        raise ValueError(f"{path} is not a bench CSV: columns {sorted(missing)} are missing "
                         f"(expected the columns written by bench: {COLUMNS})")
    frame["provider"] = frame["provider"].replace(RENAMED_PROVIDERS)
    frame["note"] = frame.get("note", pd.Series(dtype=str)).fillna("")
    frame["variant"] = frame["dtype"] + " " + frame["layout"]
    return frame


def _providers(frame: pd.DataFrame) -> list[str]:
    present = set(frame["provider"])
    return [p for p in PROVIDERS if p in present]


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


MODE_WORDS = {"fwd": "forward (no grad)", "bwd": "backward alone",
              "fwd+bwd": "forward + backward"}
LAYOUT_WORDS = {"nchw": "NCHW", "channels_last": "channels-last"}
PROVIDER_WORDS = {"static": "static conv (the reference)", "loop": "loop (one conv per sample)",
                  "grouped": "grouped trick (batch folded into groups)", "auto": "auto",
                  "native": "native", "triton": "triton"}
MEMORY_WORDS = {
    "fresh_process_vmhwm": "peak memory of a fresh process during one call, above its memory "
                           "just before",
    "cuda_max_memory_allocated": "peak CUDA memory allocated during one call, above what was "
                                 "allocated before",
}
# log-axis tick ladders, finest first: the finest one with at most MAX_TICKS ticks is used
LADDERS = ((1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,))
MAX_TICKS = 8


def _figure(rows: int, cols: int, width: float = 4.6, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             layout="constrained")
    return plt, fig, axes


def _save(plt, fig, path: str, title: str) -> str:
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _figure_legend(fig, axes) -> None:
    """One legend for the figure, under the panels: every label drawn on any panel, once."""
    entries: dict[str, object] = {}
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncols=min(len(entries), 5), fontsize=8, frameon=False)


def log_ticks(low: float, high: float) -> list[float]:
    """Round tick values for a log axis from one at or below ``low`` to one at or above
    ``high``: the finest ladder (1, 1.5, 2, 3, 5, 7 per decade, then coarser) that needs at most
    MAX_TICKS ticks, so the ticks frame every value and are close enough to read them by."""
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"log_ticks: expected 0 < low <= high, got {low}, {high}")
    first, last = math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1
    for ladder in LADDERS:
        values = sorted({float(f"{m * 10.0 ** e:.6g}") for e in range(first, last + 1)
                         for m in ladder})
        below = max(v for v in values if v <= low * (1 + 1e-9))
        above = min(v for v in values if v >= high * (1 - 1e-9))
        ticks = [v for v in values if below <= v <= above]
        if len(ticks) <= MAX_TICKS:
            return ticks
    step = math.ceil((last - first) / MAX_TICKS)
    return [10.0 ** e for e in range(first, last + step, step)]


def _log_axis(ax, values, axis: str = "y", include: tuple[float, ...] = ()) -> None:
    """A log axis whose labelled ticks frame ``values`` (and ``include``), in plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    finite = [float(v) for v in [*values, *include] if v == v and v > 0 and math.isfinite(v)]
    if not finite:
        return
    ticks = log_ticks(min(finite), max(finite))
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    target.set_minor_locator(NullLocator())
    margin = (ticks[-1] / ticks[0]) ** 0.03 if ticks[-1] > ticks[0] else 1.2
    (ax.set_ylim if axis == "y" else ax.set_xlim)(ticks[0] / margin, ticks[-1] * margin)


def _batch_axis(ax, batches) -> None:
    """x: the measured batch sizes, on a log-2 axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(batches))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _variant_words(dtype: str, layout: str) -> str:
    return f"{dtype}, {LAYOUT_WORDS.get(layout, layout)}"


def _layer_words(row) -> str:
    """``128 -> 128 channels, 3x3 kernel, stride 1, on 7x7`` from a CSV row's geometry."""
    kind = "depthwise " if row["groups"] > 1 and row["groups"] == row["cin"] else ""
    return (f"{kind}{row['cin']} -> {row['cout']} channels, {row['kh']}x{row['kw']} kernel, "
            f"stride {row['stride']}, on {row['h']}x{row['w']}")


def _variants(frame: pd.DataFrame, columns: list[str]) -> list[tuple]:
    return list(frame[columns].drop_duplicates().itertuples(index=False, name=None))


def _provider_line(ax, xs, ys, provider: str) -> None:
    style = {"linestyle": "--", "linewidth": 2} if provider == "static" else {}
    ax.plot(xs, ys, marker="o", label=PROVIDER_WORDS.get(provider, provider),
            color=COLORS.get(provider), **style)


def plot_throughput_vs_batch(frame: pd.DataFrame, path: str, title: str) -> str | None:
    data = _ok(frame[frame["group"] == "batch"])
    if data.empty:
        return None
    keys = ["shape", "dtype", "layout", "experts"]
    variants = _variants(data, keys)[:4]
    plt, fig, axes = _figure(len(variants), len(MODES))
    for row, variant in enumerate(variants):
        sub = data[(data[keys] == pd.Series(variant, index=keys)).all(axis=1)]
        for col, mode in enumerate(MODES):
            ax = axes[row][col]
            part = sub[sub["mode"] == mode]
            for provider in _providers(part):
                line = part[part["provider"] == provider].sort_values("batch")
                _provider_line(ax, line["batch"], line["samples_per_s"], provider)
            _batch_axis(ax, sub["batch"])
            _log_axis(ax, part["samples_per_s"])
            ax.set_xlabel("batch")
            ax.set_ylabel("samples / s (higher is faster)")
            ax.set_title(MODE_WORDS.get(mode, mode) if len(variants) == 1 else
                         f"{MODE_WORDS.get(mode, mode)}: {variant[0]}, "
                         f"{_variant_words(variant[1], variant[2])}, K = {variant[3]}",
                         fontsize=9)
            ax.grid(True, alpha=0.3)
    _figure_legend(fig, axes)
    if len(variants) == 1:
        variant = variants[0]
        first = data[data["shape"] == variant[0]].iloc[0]
        title += (f"\n{_layer_words(first)}, {_variant_words(variant[1], variant[2])}, "
                  f"K = {variant[3]}")
    return _save(plt, fig, path, title)


def plot_ratio_by_layer(frame: pd.DataFrame, path: str, title: str) -> str | None:
    data = _ok(frame[(frame["group"] == "layers") & (frame["provider"] != "static")])
    if data.empty:
        return None
    keys = ["dtype", "layout", "batch", "experts"]
    variants = _variants(data, keys)[:4]
    modes = [m for m in ("fwd", "fwd+bwd") if m in set(data["mode"])]
    layers = list(dict.fromkeys(data["shape"]))
    plt, fig, axes = _figure(len(variants), len(modes), width=max(5.0, 0.55 * len(layers) + 2),
                             height=4.4)
    for row, variant in enumerate(variants):
        sub = data[(data[keys] == pd.Series(variant, index=keys)).all(axis=1)]
        providers = _providers(sub)
        width = 0.8 / max(1, len(providers))
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            part = sub[sub["mode"] == mode]
            for i, provider in enumerate(providers):
                bars = part[part["provider"] == provider]
                ratios = bars.set_index("shape")["ratio_to_static"].reindex(layers)
                xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(layers))]
                ax.bar(xs, ratios.values, width=width, color=COLORS.get(provider),
                       label=PROVIDER_WORDS.get(provider, provider))
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1,
                       label="static conv = 1")
            _log_axis(ax, part["ratio_to_static"], include=(1.0,))
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("layer: Cin->Cout, kernel k, stride s, @ input size (dw = depthwise)",
                          fontsize=8)
            ax.set_ylabel("time / static conv time (lower is faster)")
            ax.set_title(f"{MODE_WORDS.get(mode, mode)}: "
                         f"{_variant_words(variant[0], variant[1])}, batch {variant[2]}, "
                         f"K = {variant[3]}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    _figure_legend(fig, axes)
    return _save(plt, fig, path, title)


def plot_memory_vs_batch(frame: pd.DataFrame, path: str, title: str) -> str | None:
    data = _ok(frame[(frame["group"] == "batch") & (frame["mode"] == "fwd+bwd")])
    data = data[data["mem_extra_bytes"].notna()] if "mem_extra_bytes" in data else data.iloc[:0]
    if data.empty:
        return None
    method = data["mem_method"].iloc[0] if "mem_method" in data else ""
    plt, fig, axes = _figure(1, 1, width=6.4, height=4.6)
    ax = axes[0][0]
    for provider in _providers(data):
        line = data[data["provider"] == provider].sort_values("batch")
        _provider_line(ax, line["batch"], line["mem_extra_bytes"] / 2**20, provider)
    _batch_axis(ax, data["batch"])
    _log_axis(ax, data["mem_extra_bytes"] / 2**20)
    ax.set_xlabel("batch")
    ax.set_ylabel("peak memory above the inputs (MiB)")
    first = data.iloc[0]
    ax.set_title(f"forward + backward, {_layer_words(first)}, "
                 f"{_variant_words(first['dtype'], first['layout'])}\n"
                 f"{MEMORY_WORDS.get(method, method)}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path, title)


def plot_ratio_vs_axis(frame: pd.DataFrame, path: str, title: str) -> str | None:
    data = _ok(frame[(frame["provider"] != "static") & (frame["mode"] == "fwd+bwd")])
    groups = [g for g in AXIS_GROUPS if g[0] in set(data["group"])]
    if not groups:
        return None
    plt, fig, axes = _figure(1, len(groups), height=3.8)
    for col, (group, column, xlabel) in enumerate(groups):
        ax = axes[0][col]
        sub = data[data["group"] == group]
        categorical = not pd.api.types.is_numeric_dtype(sub[column])
        order = list(dict.fromkeys(sub[column])) if categorical else sorted(set(sub[column]))
        for provider in _providers(sub):
            line = sub[sub["provider"] == provider].set_index(column)["ratio_to_static"]
            line = line[~line.index.duplicated()].reindex(order)
            xs = range(len(order)) if categorical else order
            _provider_line(ax, list(xs), line.values, provider)
        if categorical:
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels([" ".join(LAYOUT_WORDS.get(w, w) for w in str(v).split())
                                for v in order], rotation=20, fontsize=8)
        else:
            _batch_axis(ax, order)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="static conv = 1")
        _log_axis(ax, sub["ratio_to_static"], include=(1.0,))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward + backward time / static conv time")
        first = sub.iloc[0]
        fixed = [f"batch {first['batch']}"]
        if sub["experts"].nunique() == 1:
            fixed.append(f"K = {first['experts']}")
        if sub["shape"].nunique() == 1:
            fixed.append(_layer_words(first))
        if sub["variant"].nunique() == 1:
            fixed.append(_variant_words(first["dtype"], first["layout"]))
        ax.set_title(f"varying {xlabel.split(' (')[0]}\n" + ", ".join(fixed), fontsize=8)
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, axes)
    return _save(plt, fig, path, title)


def _geomean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _load_line(frame: pd.DataFrame) -> list[str]:
    """The machine's 1-minute load average during a CPU run (other processes skew timings)."""
    if "load_avg_1min" not in frame or frame["load_avg_1min"].isna().all():
        return []
    first = frame.iloc[0]
    if first["device"] == "cuda":
        return []
    load = frame["load_avg_1min"]
    cpus = first.get("cpus", "?")
    return [f"- machine load (1-minute load average) during the run: {load.min():.1f} to "
            f"{load.max():.1f} on {cpus} CPUs"]


def summary_section(frame: pd.DataFrame, images: list[str]) -> list[str]:
    """Markdown for one bench CSV: run facts, then the figures behind each plot."""
    first = frame.iloc[0]
    gpu = first["device"] == "cuda"
    ok = _ok(frame)
    providers = [p for p in _providers(ok) if p != "static"]
    lines = [
        f"## Preset `{first['preset']}` ({first['run_id']})",
        "",
        f"- device: {first['device_name']} ({first['device']}), {first.get('threads', '?')} "
        f"thread{'' if str(first.get('threads')) == '1' else 's'}; torch {first['torch']}, "
        f"Triton {first['triton'] or '-'}, "
        f"Python {first['python']}"
        + (f"; commit {first['commit']}" if isinstance(first.get("commit"), str) else ""),
        *_load_line(frame),
        f"- timing: median of {first.get('rounds', '?')} rounds, each round one static-conv "
        f"sample then one provider sample of the same shape"
        + (" (`triton.testing.do_bench` median per sample)" if gpu else
           " (wall clock; a sample repeats sub-10 ms calls up to 20 times)")
        + "; ratio = median of the per-round ratios provider / static",
        "- modes: fwd = inference forward (no_grad), bwd = backward alone, fwd+bwd = both; "
        "the router MLP is not included (routing weights are an input)",
        f"- reproduce: `python -m dynconv.autotune bench --preset {first['preset']}"
        + (" --device cpu" if not gpu else "") + "` then `python -m dynconv.autotune report "
        "<folder>`" + (" (`make report` does both)" if first["preset"] == "quick" else ""),
        "- memory: " + ("`torch.cuda.max_memory_allocated` during one call, minus what was "
                        "allocated before it" if gpu else
                        "peak RSS (VmHWM) of a fresh process during one forward+backward, "
                        "minus its RSS just before it"),
        "",
    ]
    layers = ok[ok["group"] == "layers"]
    if not layers.empty:
        lines += ["### Time / static conv time, geometric mean over the layer shapes", ""]
        rows = []
        for provider in providers:
            rows.append([provider] + [_fmt(_geomean(layers[(layers["provider"] == provider) & (
                layers["mode"] == mode)]["ratio_to_static"])) for mode in MODES])
        lines += _table(["provider", *MODES], rows) + [""]
        lines += ["### Per layer shape (forward+backward)", ""]
        keys = ["shape", "batch", "dtype", "layout", "experts"]
        header = ["layer", "batch", "dtype", "static ms"] + [f"{p} ratio" for p in providers]
        if gpu:
            header += ["static TFLOP/s", "best dynamic TFLOP/s (% of peak)"]
        rows = []
        fb = layers[layers["mode"] == "fwd+bwd"]
        for variant in _variants(fb, keys):
            sub = fb[(fb[keys] == pd.Series(variant, index=keys)).all(axis=1)]
            static = sub[sub["provider"] == "static"]
            row = [str(variant[0]), str(variant[1]), f"{variant[2]} {variant[3]}",
                   _fmt(static["time_ms"].iloc[0] if not static.empty else None, 3)]
            for provider in providers:
                value = sub[sub["provider"] == provider]["ratio_to_static"]
                row.append(_fmt(value.iloc[0] if not value.empty else None))
            if gpu:
                dyn = sub[sub["provider"] != "static"].sort_values("tflops", ascending=False)
                row.append(_fmt(static["tflops"].iloc[0] if not static.empty else None, 1))
                row.append(f"{_fmt(dyn['tflops'].iloc[0], 1)} {dyn['provider'].iloc[0]} "
                           f"({_fmt(100 * dyn['peak_fraction'].iloc[0], 1)}%)"
                           if not dyn.empty else "-")
            rows.append(row)
        lines += _table(header, rows) + [""]
    nd = ok[ok["group"] == "1d-3d"]
    if not nd.empty:
        lines += ["### 1-D and 3-D layers (time / static `F.conv1d` / `F.conv3d` time)", ""]
        rows = []
        for shape in list(dict.fromkeys(nd["shape"])):
            sub = nd[nd["shape"] == shape]
            static = sub[(sub["provider"] == "static") & (sub["mode"] == "fwd+bwd")]
            row = [str(shape), str(sub["batch"].iloc[0]),
                   _fmt(static["time_ms"].iloc[0] if not static.empty else None, 3)]
            for provider in providers:
                for mode in ("fwd", "fwd+bwd"):
                    value = sub[(sub["provider"] == provider) & (sub["mode"] == mode)][
                        "ratio_to_static"]
                    row.append(_fmt(value.iloc[0] if not value.empty else None))
            rows.append(row)
        header = ["layer", "batch", "static fwd+bwd ms"] + [
            f"{p} {m}" for p in providers for m in ("fwd", "fwd+bwd")]
        lines += _table(header, rows) + [""]
    batch = ok[(ok["group"] == "batch") & (ok["mode"] == "fwd+bwd")]
    if not batch.empty:
        lines += [f"### Batch sweep ({batch.iloc[0]['shape']}, forward+backward)", ""]
        all_providers = ["static", *providers]
        header = ["batch"] + [f"{p} ratio" for p in providers] + [
            f"{p} MiB" for p in all_providers]
        rows = []
        for b in sorted(set(batch["batch"])):
            sub = batch[batch["batch"] == b].set_index("provider")
            row = [str(b)]
            row += [_fmt(sub["ratio_to_static"].get(p)) for p in providers]
            row += [_fmt(sub["mem_extra_bytes"].get(p, float("nan")) / 2**20, 1)
                    for p in all_providers]
            rows.append(row)
        lines += _table(header, rows) + [""]
    other = ok[ok["group"].isin([g for g, _, _ in AXIS_GROUPS]) & (ok["mode"] == "fwd+bwd")]
    for group, column, label in AXIS_GROUPS:
        sub = other[other["group"] == group]
        if sub.empty:
            continue
        lines += [f"### {label} sweep (forward+backward ratio to static)", ""]
        rows = []
        for value in list(dict.fromkeys(sub[column])):
            part = sub[sub[column] == value].set_index("provider")["ratio_to_static"]
            part = part[~part.index.duplicated()]
            rows.append([str(value)] + [_fmt(part.get(p)) for p in providers])
        lines += _table([label, *providers], rows) + [""]
    problems = frame[frame["status"] != "ok"][["provider", "status", "note"]].drop_duplicates()
    if not problems.empty:
        lines += ["### Not measured", ""]
        for _, row in problems.iterrows():
            lines.append(f"- `{row['provider']}`: {row['status']}: {row['note']}")
        lines.append("")
    if images:
        lines += ["### Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                      for p in images] + [""]
    return lines


def render(csv_paths: list[str], out_root: str | None = None,
           explicit: tuple[str, ...] = ()) -> list[str]:
    """Render every CSV; return the paths written (PNGs and one summary.md per folder).

    A CSV in ``explicit`` (named on the command line) that is not a bench CSV is an error; one
    found by searching a folder is skipped with a message.
    """
    by_folder: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for path in csv_paths:
        try:
            frame = load(path)
        except ValueError as exc:
            if path in explicit:
                raise
            print(f"report: skipping {exc}", file=sys.stderr)
            continue
        if frame.empty:
            print(f"report: {path} has no rows; skipped", file=sys.stderr)
            continue
        slug = str(frame["device_slug"].iloc[0])
        folder = os.path.join(out_root, slug) if out_root else os.path.dirname(path) or "."
        by_folder.setdefault(folder, []).append((path, frame))
    written = []
    for folder, frames in by_folder.items():
        os.makedirs(folder, exist_ok=True)
        first = frames[0][1].iloc[0]
        lines = [f"# dynconv performance: {first['device_name']}", "",
                 "Generated by `python -m dynconv.autotune report` from "
                 + ", ".join(f"`{os.path.basename(p)}`" for p, _ in frames) + ".", ""]
        for _path, frame in frames:
            preset = str(frame["preset"].iloc[0])
            threads = frame["threads"].iloc[0] if "threads" in frame else "?"
            title = (f"{frame['device_name'].iloc[0]} ({frame['device'].iloc[0]}, {threads} "
                     f"thread{'' if str(threads) == '1' else 's'}): bench preset {preset}")
            images = []
            for name, plot in (("throughput_vs_batch", plot_throughput_vs_batch),
                               ("ratio_by_layer", plot_ratio_by_layer),
                               ("memory_vs_batch", plot_memory_vs_batch),
                               ("ratio_vs_axis", plot_ratio_vs_axis)):
                image = plot(frame, os.path.join(folder, f"{preset}_{name}.png"), title)
                if image:
                    images.append(image)
            written += images
            lines += summary_section(frame, images)
        summary = os.path.join(folder, "summary.md")
        with open(summary, "w") as f:
            f.write("\n".join(lines).rstrip() + "\n")
        written.append(summary)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.autotune report",
        description="Render bench CSVs (files, or folders searched for bench_*.csv) into PNG "
                    "plots and a summary.md next to each CSV (or under --out/<device>/).")
    parser.add_argument("paths", nargs="+", help="bench CSV files or folders")
    parser.add_argument("--out", default=None, help="write under OUT/<device>/ instead")
    args = parser.parse_args(argv)
    try:
        csvs = find_csvs(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if not csvs:
        parser.error(f"no bench_*.csv found under {args.paths}")
    try:
        written = render(csvs, args.out, tuple(p for p in args.paths if os.path.isfile(p)))
    except ValueError as exc:
        parser.error(str(exc))
    for path in written:
        print(f"report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
