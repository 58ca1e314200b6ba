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

ODConv (bench's presets ``odconv`` and ``odconv-tiny``) has a CSV of its own, ``odconv.csv``,
which a folder search does not take for a bench CSV: named on the command line, it is rendered
into ``odconv.md`` beside it (:func:`odconv_section`: time and peak memory of the library's
ODConv and of the published formulation, as ratios to the static conv); found beside a bench
CSV, the same section closes that folder's ``summary.md`` (after everything else, the CPU goals
untouched) and ``odconv.md`` is written too.

A CPU run's summary opens with the CPU goals (:func:`goals_section`), on it and on its
companion runs: the same preset with other CPU allocator settings (bench's ``--allocator``,
recorded in its ``thp_mem_alloc_enable`` and ``malloc_env`` columns; ``--companion``, by default
``<root>/steady/<device>/`` and ``<root>/thp/<device>/`` next to ``<root>/<device>/``, where
``make report`` writes them; a missing run is said, not dropped):

- the speed rule on every case and mode (forward, forward+backward): ``auto`` within 5 % or
  within 0.2 ms per call of the better of ``loop`` and ``grouped`` (the rule of
  :func:`dynconv.autotune.cpu_formulations.within_goal`, on each provider's minimum over the
  interleaved rounds), on this run and on the companion with the rule's cases (glibc's heap
  kept), side by side, the rows counted and those outside listed with what ``auto`` ran;
- the geometric mean of ``auto``'s forward+backward ratio to static over the ``layers`` group
  per allocator setting: as the machine comes (goal <= 1.3x), with the documented setting
  (goal <= 1.2x), with ``THP_MEM_ALLOC_ENABLE=1`` (shown);
- the memory goal: ``auto``'s forward+backward peak excess over the static conv as a percentage
  of the grouped trick's, on every case measured at batch 32 (goal <= 40 %; where B x |W| is
  within the native backend's saving threshold auto may hold what the trick holds: there no
  more than the trick's).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys

import pandas as pd

from .bench import (
    COLUMNS,
    DEFAULT_SAMPLE_MS,
    DTYPES,
    MEMORY_GROUP,
    MODES,
    ODCONV_GROUP,
    ODCONV_PROVIDERS,
    ODCONV_PUBLISHED,
    PRESET_CSV,
    PROVIDERS,
    RENAMED_PROVIDERS,
    STEADY_HEAP_WORDS,
    THP_VARIABLE,
)
from .cpu_formulations import GOAL_FRACTION, GOAL_MS, within_goal

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
    frame["note"] = frame.get("note", pd.Series(dtype=object)).astype(object).fillna("")
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


# ---------------------------------------------------------------------------------------------
# the CPU goals

RULE_MODES = ("fwd", "fwd+bwd")
# bench's auto_path of a call that ran autograd's graph of the grouped trick
TRICK_GRAPH = "the grouped trick's graph"
RULE_PROVIDERS = ("auto", "loop", "grouped")
# the measurement a row belongs to (a case repeated in several sweeps is measured once)
CASE_KEYS = ["shape", "batch", "experts", "dtype", "layout"]
# the CPU allocator settings a run can have (bench's --allocator) -> (words, goal of the
# geometric mean of auto's forward+backward ratio over the layers, or None: shown, no goal);
# "steady_heap" is the documented setting (README, "Performance")
ALLOCATOR_GOALS = {"default": ("as the machine comes", 1.3),
                   "steady_heap": (f"with glibc's heap kept (`{STEADY_HEAP_WORDS}`, the "
                                   f"documented setting)", 1.2),
                   "thp": (f"with `{THP_VARIABLE}=1`", None)}
# the same settings in a table header
SHORT_SETTING_WORDS = {"default": "as it comes", "steady_heap": "steady heap", "thp": "THP"}
# the folder under a report's root that make report writes each companion run to
COMPANION_FOLDERS = {"steady_heap": "steady", "thp": "thp"}
MEMORY_BATCH = 32
MEMORY_GOAL_PERCENT = 40.0
# Where B x |W| is within the native backend's saving threshold, auto may hold what the trick
# holds (its mixed weights, or the trick's own graph): its excess is then held to the trick's,
# plus this much for the RSS of two fresh processes (pages, Python objects; measured apart by
# at most 0.3 MiB on the same calls).
MEMORY_SAME_AS_TRICK_SLACK_BYTES = 2**20


def rule_ok(auto_ms: float, best_ms: float) -> bool:
    """The CPU speed rule on two times of one case and mode: ``auto`` at most 5 % or at most
    0.2 ms per call above the better baseline (:func:`~.cpu_formulations.within_goal` on the
    times themselves, i.e. on ratios to a reference of 1 ms)."""
    return within_goal(auto_ms, best_ms, 1.0)


def _case_words(row) -> str:
    return (f"B{row['batch']} {row['shape']} K{row['experts']} "
            f"{_variant_words(row['dtype'], row['layout'])}")


def rule_rows(frame: pd.DataFrame) -> tuple[list[dict], list[str]]:
    """(one dict per case and mode (fwd, fwd+bwd) that has auto, loop and grouped measured:
    the three times, the better baseline, auto's excess over it and the verdict of
    :func:`rule_ok`; the cases a provider is missing or failed on, in words). A case repeated in
    several sweeps is one measurement (bench times it once) and one row, naming its groups."""
    data = frame[frame["mode"].isin(RULE_MODES) & frame["provider"].isin(RULE_PROVIDERS)
                 & (frame["group"] != MEMORY_GROUP)]  # memory probes are not timed
    rows, unchecked = [], []
    for _key, sub in data.groupby(CASE_KEYS + ["mode"], sort=False):
        first = sub.iloc[0]
        ok = _ok(sub).drop_duplicates("provider").set_index("provider")["time_ms"]
        missing = [p for p in RULE_PROVIDERS if p not in ok.index or not ok[p] > 0]
        if missing:
            unchecked.append(f"{_case_words(first)}, {first['mode']}: no time for "
                             f"{', '.join(missing)}")
            continue
        best = "loop" if ok["loop"] <= ok["grouped"] else "grouped"
        auto, best_ms = float(ok["auto"]), float(ok[best])
        path = ""
        if "auto_path" in sub:
            paths = sub[(sub["provider"] == "auto") & (sub["status"] == "ok")]["auto_path"]
            path = next((p for p in paths if isinstance(p, str) and p), "")
        rows.append({
            "case": _case_words(first), "groups": ", ".join(dict.fromkeys(sub["group"])),
            "mode": first["mode"], "auto_ms": auto, "loop_ms": float(ok["loop"]),
            "grouped_ms": float(ok["grouped"]), "best": best, "best_ms": best_ms,
            "excess_ms": auto - best_ms, "excess_percent": 100 * (auto / best_ms - 1),
            "ok": rule_ok(auto, best_ms), "auto_path": path})
    return rows, unchecked


def setting_words(setting: str) -> str:
    """An allocator setting of allocator_setting_of in words ("as the machine comes"...)."""
    return ALLOCATOR_GOALS.get(setting, ("with another allocator setting", None))[0]


def allocator_setting_of(frame: pd.DataFrame) -> str | None:
    """The CPU allocator setting a run recorded: ``default`` (none of the variables set),
    ``thp``, ``steady_heap`` (STEADY_HEAP_ENV, nothing else), ``other``; None when the CSV
    does not record it (written before the columns)."""
    if "thp_mem_alloc_enable" not in frame or frame["thp_mem_alloc_enable"].isna().all():
        return None
    value = str(frame["thp_mem_alloc_enable"].dropna().iloc[0]).strip().lower()
    thp = value in ("1", "1.0", "true", "yes", "on")
    malloc = "unset"
    if "malloc_env" in frame and not frame["malloc_env"].isna().all():
        malloc = str(frame["malloc_env"].dropna().iloc[0]).strip()
    if malloc == "unset":
        return "thp" if thp else "default"
    if not thp and malloc == STEADY_HEAP_WORDS:
        return "steady_heap"
    return "other"


def layers_geomean(frame: pd.DataFrame, provider: str = "auto") -> tuple[float, int]:
    """(geometric mean of ``provider``'s forward+backward ratio to static over the ``layers``
    group, how many layers it covers)."""
    ok = _ok(frame)
    ratios = ok[(ok["group"] == "layers") & (ok["mode"] == "fwd+bwd")
                & (ok["provider"] == provider)].drop_duplicates(CASE_KEYS)["ratio_to_static"]
    return _geomean(list(ratios)), int(ratios.notna().sum())


def _by_setting(runs: list[tuple[str, pd.DataFrame | None, str]]
                ) -> tuple[dict[str, tuple[str, pd.DataFrame, str]], list[str]]:
    """(setting -> the first of ``runs`` ((label, frame, why the frame is None)) that had it,
    with "" or a note that the setting was assumed; what each run was, in words)."""
    by_setting: dict[str, tuple[str, pd.DataFrame, str]] = {}
    what: list[str] = []
    for label, frame, why in runs:
        if frame is None:
            what.append(f"`{label}`: {why or 'not found'}")
            continue
        recorded = allocator_setting_of(frame)
        setting = recorded or "default"
        assumed = "" if recorded else "; assumed: the CSV does not record its allocator"
        words = setting_words(setting)
        if setting in by_setting:
            what.append(f"`{label}` is a second run {words}")
        else:
            by_setting[setting] = (label, frame, assumed)
            what.append(f"`{label}` ran {words}")
    return by_setting, what


def geomean_lines(runs: list[tuple[str, pd.DataFrame | None, str]]) -> list[str]:
    """One line per allocator setting of ALLOCATOR_GOALS: the geometric mean of ``auto``'s
    forward+backward ratio over the layers, from the first of ``runs`` ((label, frame, why
    the frame is None: a CSV not found)) that had that setting, against the setting's goal. A
    setting with a goal that no run had is said to be not measured, with what each run was."""
    by_setting, what = _by_setting(runs)
    lines = []
    for setting, (words, goal) in ALLOCATOR_GOALS.items():
        label, frame, assumed = by_setting.get(setting, (None, None, ""))
        mean, count = layers_geomean(frame) if frame is not None else (math.nan, 0)
        if not count:
            if goal is not None:
                lines.append(f"- {words} (goal <= {goal}x static): **not measured**: "
                             + "; ".join(what))
            continue
        trick, _ = layers_geomean(frame, "grouped")
        verdict = ("no goal" if goal is None else
                   f"goal <= {goal}x): **{'met' if mean <= goal else 'not met'}**")
        lines.append(f"- {words}: auto **{_fmt(mean)}x** static over {count} layers ("
                     + (verdict + ")" if goal is None else verdict)
                     + f" (the trick {_fmt(trick)}x; the static conv "
                     f"{_layers_static_ms(frame)}; from `{label}`{assumed})")
    return lines


def _layers_static_ms(frame: pd.DataFrame) -> str:
    """The static conv's forward+backward times over the layers, in ms, in words."""
    ok = _ok(frame)
    static = ok[(ok["group"] == "layers") & (ok["mode"] == "fwd+bwd")
                & (ok["provider"] == "static")].drop_duplicates(CASE_KEYS)["time_ms"]
    return f"{static.sum():.0f} ms over them"


def mixed_within_threshold(row) -> bool:
    """Whether a case's B x |W| mixed weights are within the native backend's saving threshold
    (``within_saving_threshold``: then auto may keep them, or take the trick's own graph)."""
    from dynconv.backends.native.op import within_saving_threshold

    size = DTYPES[str(row["dtype"])].itemsize
    taps = int(row.get("kd", 1) or 1) * int(row["kh"]) * int(row["kw"])
    weight = int(row["cout"]) * int(row["cin"]) // int(row["groups"]) * taps
    pixels = int(row.get("d", 1) or 1) * int(row["h"]) * int(row["w"])
    batch = int(row["batch"])
    return within_saving_threshold(batch * weight * size, batch * int(row["cin"]) * pixels * size)


def memory_rows(frame: pd.DataFrame, batch: int = MEMORY_BATCH) -> list[dict]:
    """One dict per case measured at ``batch`` with forward+backward peak memory for static,
    auto and grouped: the three excesses (bytes above the memory before the call), auto's
    excess over static as a percentage of the trick's (-inf when auto has none: within any
    goal; +inf when only auto has one), whether B x |W| is within the saving threshold
    (:func:`mixed_within_threshold`) and whether it is within the goal: at most
    MEMORY_GOAL_PERCENT of the trick's excess, or where the threshold lets auto hold what the
    trick holds, no more than the trick's (plus MEMORY_SAME_AS_TRICK_SLACK_BYTES)."""
    ok = _ok(frame)
    data = ok[(ok["mode"] == "fwd+bwd") & (ok["batch"] == batch)]
    if "mem_extra_bytes" not in data:
        return []
    data = data[data["mem_extra_bytes"].notna()]
    rows = []
    for _key, sub in data.groupby(CASE_KEYS, sort=False):
        extra = sub.drop_duplicates("provider").set_index("provider")["mem_extra_bytes"]
        if not {"static", "auto", "grouped"} <= set(extra.index):
            continue
        trick = extra["grouped"] - extra["static"]
        own = extra["auto"] - extra["static"]
        percent = (100 * own / trick if trick > 0 and own > 0 else
                   -math.inf if own <= 0 else math.inf)
        small = mixed_within_threshold(sub.iloc[0])
        rows.append({"case": _case_words(sub.iloc[0]),
                     "groups": ", ".join(dict.fromkeys(sub["group"])),
                     "static": extra["static"], "auto": extra["auto"],
                     "grouped": extra["grouped"], "percent": percent, "small": small,
                     "ok": percent <= MEMORY_GOAL_PERCENT or (
                         small and own <= trick + MEMORY_SAME_AS_TRICK_SLACK_BYTES)})
    return rows


def _rule_count(rows: list[dict]) -> str:
    passed = sum(r["ok"] for r in rows)
    per_mode = ", ".join(
        f"{MODE_WORDS[m].split(' (')[0]} {sum(r['ok'] for r in rows if r['mode'] == m)} of "
        f"{sum(r['mode'] == m for r in rows)}" for m in RULE_MODES)
    return f"**{passed} of {len(rows)} rows ok** ({per_mode})"


def _excess_words(row: dict) -> str:
    """A rule row's auto - best, in ms and per cent."""
    return f"{row['excess_ms']:+.3f} ({row['excess_percent']:+.1f} %)"


def _outside_lines(rows: list[dict]) -> list[str]:
    return [f"- {r['case']} ({r['groups']}), {r['mode']}: auto {r['auto_ms']:.3f} ms "
            f"against {r['best']} {r['best_ms']:.3f} ms (+{r['excess_ms']:.3f} ms, "
            f"+{r['excess_percent']:.1f} %)"
            + (f"; auto ran {r['auto_path']}" if r.get("auto_path") else "")
            for r in rows if not r["ok"]]


def _setting_words(frame: pd.DataFrame) -> str:
    return setting_words(allocator_setting_of(frame) or "default")


def goals_section(frame: pd.DataFrame, label: str,
                  companions: list[tuple[str, pd.DataFrame | None, str]] = ()) -> list[str]:
    """The CPU goals on one CPU run (``label``: its CSV's name) and its ``companions``: (label,
    frame, why the frame is None) of the runs of the same preset with other allocator settings
    (make report's). The speed rule on this run and on each companion that has the rule's
    cases (the table shows them side by side, with what auto ran); one geometric mean per
    setting (:func:`geomean_lines`); the memory goal on this run."""
    runs = [(label, frame, "")] + list(companions)
    rule_runs = [(label, frame, *rule_rows(frame))]
    for other_label, other, _why in companions:
        if other is not None:
            other_rows, other_unchecked = rule_rows(other)
            if other_rows:
                rule_runs.append((other_label, other, other_rows, other_unchecked))
    rows = rule_runs[0][2]
    lines = ["### The CPU goals", ""]
    statistic = ("its minimum over the interleaved rounds" if "ratio_median" in frame else
                 "the median of its rounds, in a CSV written before the rounds were balanced "
                 "and the minimum kept")
    lines += [f"**Speed rule**: `auto` within {100 * GOAL_FRACTION:.0f} % or within "
              f"{GOAL_MS} ms per call of the better of `loop` and `grouped` (each provider's "
              f"time: {statistic})"
              + (", in each run of the same cases (on this machine a call's time depends on "
                 "what the allocator kept from the calls before it: the runs differ in that)"
                 if len(rule_runs) > 1 else "") + ":", ""]
    for run_label, run_frame, run_rows, run_unchecked in rule_runs:
        passed = sum(r["ok"] for r in run_rows)
        same = sum(not r["ok"] and r.get("auto_path") == TRICK_GRAPH for r in run_rows)
        lines.append(f"- {_setting_words(run_frame)} (`{run_label}`): {_rule_count(run_rows)}; "
                     + ("**met** on every row" if run_rows and passed == len(run_rows)
                        and not run_unchecked else "**not met**" if run_rows else
                        "**not measured** (no case has auto, loop and grouped)")
                     + (f" ({same} of the rows outside ran the trick's own graph: the same "
                        f"calls as `grouped`, two measurements of them apart)" if same else ""))
    for _label, run_frame, run_rows, run_unchecked in rule_runs:
        if any(not r["ok"] for r in run_rows):
            lines += ["", f"Rows outside the rule, {_setting_words(run_frame)}:", ""]
            lines += _outside_lines(run_rows)
        if run_unchecked:
            lines += ["", f"Rows not checked (a provider did not run), "
                          f"{_setting_words(run_frame)}:", ""]
            lines += [f"- {line}" for line in run_unchecked]
    if rows:
        others = [{(r["case"], r["mode"]): r for r in run[2]} for run in rule_runs[1:]]
        extra_header = []
        for run in rule_runs[1:]:
            short = SHORT_SETTING_WORDS.get(allocator_setting_of(run[1]) or "default", run[0])
            extra_header += [f"{short}: auto - best ms", "rule"]

        def other_cells(r: dict) -> list[str]:
            cells = []
            for by_key in others:
                other = by_key.get((r["case"], r["mode"]))
                cells += (["-", "-"] if other is None else
                          [_excess_words(other), "ok" if other["ok"] else "**outside**"])
            return cells

        lines += [""] + _table(
            ["case", "groups", "mode", "auto ms", "loop ms", "grouped ms", "auto - best ms",
             "rule", *extra_header, "auto ran"],
            [[r["case"], r["groups"], r["mode"], _fmt(r["auto_ms"], 3), _fmt(r["loop_ms"], 3),
              _fmt(r["grouped_ms"], 3),
              _excess_words(r), "ok" if r["ok"] else "**outside**", *other_cells(r),
              r.get("auto_path") or "-"]
             for r in rows])
    lines += ["", "**Geometric mean over the layers** (forward+backward, auto's time / the "
                  "static conv's):", ""]
    lines += geomean_lines(runs)
    memory = memory_rows(frame)
    goal_rows = [r for r in memory if MEMORY_GROUP in r["groups"].split(", ")] or memory
    lines += ["", f"**Memory**: auto's forward+backward peak excess over the static conv as a "
                  f"percentage of the grouped trick's, at batch {MEMORY_BATCH} (goal <= "
                  f"{MEMORY_GOAL_PERCENT:.0f} %"
              + (f" on the layers, group `{MEMORY_GROUP}`" if goal_rows is not memory else "")
              + "; where B x |W| is within the saving threshold, max(x / 4, 16 MiB), auto may "
                "hold what the trick holds: there no more than the trick's): "
              + ("**not measured**: this run has no forward+backward memory figure at batch "
                 f"{MEMORY_BATCH} for static, auto and the trick" if not memory else
                 f"**{'met' if all(r['ok'] for r in goal_rows) else 'not met'}** "
                 f"({sum(r['ok'] for r in goal_rows)} of {len(goal_rows)} within)"), ""]

    def percent(value: float) -> str:
        return ("auto no more than static" if value == -math.inf else
                "the trick no more than static" if value == math.inf else f"{value:.1f} %")

    for r in memory:
        also = ("; B x |W| within the saving threshold" if r["small"] else "") + (
            "" if r in goal_rows else "; not part of the goal")
        lines.append(f"- {r['case']} ({r['groups']}): static {r['static'] / 2**20:.1f} MiB; "
                     f"above it: auto {(r['auto'] - r['static']) / 2**20:+.1f}, the trick "
                     f"{(r['grouped'] - r['static']) / 2**20:+.1f}: "
                     f"**{percent(r['percent'])}**, {'within' if r['ok'] else 'outside'}"
                     f"{also}")
    return lines + [""]


CPU_MEMORY_WORDS = ("peak RSS (VmHWM) of a fresh process during one forward+backward, minus its "
                    "RSS just before it; glibc's mmap threshold is pinned in that process, so "
                    "every freed block goes back to the OS and the peak is what the call holds "
                    "at once")


def _cpu_run_options(frame: pd.DataFrame) -> str:
    """The bench options of a CPU run that are not the defaults: its allocator setting and
    sample length."""
    options = ""
    setting = allocator_setting_of(frame)
    if setting in ("default", "thp", "steady_heap"):
        options += " --allocator " + setting.replace("_", "-")
    sample_ms = frame.iloc[0].get("sample_ms")
    if (sample_ms is not None and sample_ms == sample_ms
            and float(sample_ms) != DEFAULT_SAMPLE_MS):
        options += f" --sample-ms {float(sample_ms):g}"
    if isolated(frame):
        options += " --isolate"
    return options


def isolated(frame: pd.DataFrame) -> bool:
    """Whether a run timed each provider in a process of its own (bench --isolate)."""
    return frame.iloc[0].get("timing_processes") == "one per provider"


def _timing_line(frame: pd.DataFrame, gpu: bool) -> str:
    first = frame.iloc[0]
    rounds = first.get("rounds", "?")
    sample_ms = first.get("sample_ms")
    sample_ms = (DEFAULT_SAMPLE_MS if sample_ms is None or sample_ms != sample_ms
                 else float(sample_ms))
    sample = (" (`triton.testing.do_bench` median per sample)" if gpu else
              f" (wall clock; a sample repeats a call back to back for at least "
              f"{sample_ms:g} ms)")
    if "ratio_median" not in frame:  # a CSV written before the rounds were rotated
        return (f"- timing: median of {rounds} rounds, each round one static-conv sample then "
                f"one provider sample of the same shape{sample}; ratio = median of the "
                f"per-round ratios provider / static")
    where = (" (each provider, the static conv too, in a process of its own, kept for the "
             "run: its own allocator state)" if isolated(frame) else "")
    return (f"- timing: minimum of {rounds} interleaved rounds; each round takes one sample of "
            f"the static conv and of every provider{where}, in an order balanced over the "
            f"rounds (each in every position, after every other){sample}; ratio = a provider's "
            f"minimum / the static conv's minimum in the same rounds (the CSV keeps the medians "
            f"too: `time_median_ms`, `ratio_median`)")


def _allocator_line(frame: pd.DataFrame) -> str:
    setting = allocator_setting_of(frame)
    if setting is None:
        return "not recorded by this CSV"
    first = frame.iloc[0]
    malloc = first.get("malloc_env")
    return (f"{setting_words(setting)} in this run "
            f"(`{THP_VARIABLE}` {first['thp_mem_alloc_enable']}; malloc "
            f"{malloc if isinstance(malloc, str) else 'unset'})")


def summary_section(frame: pd.DataFrame, images: list[str], goals: list[str] = ()
                    ) -> list[str]:
    """Markdown for one bench CSV: run facts, ``goals`` (:func:`goals_section`), then the
    figures behind each plot."""
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
        _timing_line(frame, gpu),
        "- modes: fwd = inference forward (no_grad), bwd = backward alone, fwd+bwd = both; "
        "the router MLP is not included (routing weights are an input)",
        f"- reproduce: `python -m dynconv.autotune bench --preset {first['preset']}"
        + ("" if gpu else f" --device cpu{_cpu_run_options(frame)}")
        + "` then `python -m dynconv.autotune report <folder>`"
        + (" (`make report` does both)" if first["preset"] == "quick" else ""),
        "- memory: " + ("`torch.cuda.max_memory_allocated` during one call, minus what was "
                        "allocated before it" if gpu else CPU_MEMORY_WORDS),
        *([f"- CPU allocator: {_allocator_line(frame)}"] if not gpu else []),
        "",
        *goals,
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


# ---------------------------------------------------------------------------------------------
# ODConv

ODCONV_CSV = PRESET_CSV["odconv"]
ODCONV_MODES = ("fwd", "fwd+bwd")


def is_odconv(frame: pd.DataFrame) -> bool:
    """Whether a loaded CSV is an ODConv run (its rows are of the ``odconv`` group)."""
    return not frame.empty and set(frame["group"]) == {ODCONV_GROUP}


def odconv_companion(path: str) -> str:
    """Where the ODConv CSV of the run whose bench CSV is ``path`` is (beside it)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), ODCONV_CSV)


def _memory_ratio(extra: float, static: float) -> str:
    if not (extra == extra and static == static) or static <= 0:
        return "-"
    return f"{extra / static:.2f}"


def odconv_section(frame: pd.DataFrame, label: str) -> list[str]:
    """Markdown for one ODConv CSV (``label``: its name): the library's ODConv
    (``dynamic_conv2d`` with in_scale, out_scale and tap_scale) and the published formulation,
    forward and forward+backward time and forward+backward peak memory, each as a ratio to the
    static conv of the same shape in the same run: geometric means over the layers, then per
    layer."""
    first = frame.iloc[0]
    gpu = first["device"] == "cuda"
    ok = _ok(frame)
    providers = [p for p in ODCONV_PROVIDERS if p in set(ok["provider"])]
    library = [p for p in providers if p != ODCONV_PUBLISHED]
    words = {ODCONV_PUBLISHED: "published"}
    words.update({p: p.removeprefix("odconv_") for p in library})
    auto_is = "" if gpu else " (`native` on the CPU)"
    modes = [m for m in ODCONV_MODES if m in set(frame["mode"])]
    lines = [
        f"## ODConv: the library's scales against the published formulation (`{label}`, "
        f"{first['run_id']})", "",
        f"What runs: ODConv's kernel `M_b[o, i, t] = out_scale[b, o] * in_scale[b, c] * "
        f"tap_scale[b, t] * sum_k a[b, k] W_k[o, i, t]`, plus the routed bias, on "
        f"{first['device_name']} ({first['device']}). "
        + ", ".join(f"`{p}`" for p in library)
        + ": `dynamic_conv2d(..., in_scale=, out_scale=, tap_scale=)` on that backend"
        + (auto_is if "odconv_auto" in library else "")
        + f". `{ODCONV_PUBLISHED}`: the formulation of ODConv's published code (x scaled by the "
        "input-channel attention; the B x K x |W| tensor of tap-scaled, routed experts "
        "materialised and summed over K, which autograd keeps for the backward; one grouped "
        "conv of the batch folded into the channels; y scaled by the output-channel "
        "attention). The attentions are inputs, identical for both: the routing (a softmax "
        "over K) and the three scales (sigmoids of normal draws), random positive tensors that "
        "need gradients; the router (ODConv's attention branch) is not timed: it is the same "
        "in both.", "",
        f"- {first.get('threads', '?')} thread{'' if str(first.get('threads')) == '1' else 's'}"
        f"; torch {first['torch']}, Python {first['python']}"
        + (f"; commit {first['commit']}" if isinstance(first.get("commit"), str) else ""),
        *_load_line(frame),
        _timing_line(frame, gpu),
        "- memory: " + ("`torch.cuda.max_memory_allocated` during one forward+backward, minus "
                        "what was allocated before it" if gpu else CPU_MEMORY_WORDS)
        + "; the ratio is that excess over the static conv's",
        f"- reproduce: `python -m dynconv.autotune bench --preset {first['preset']}"
        + ("" if gpu else f" --device cpu{_cpu_run_options(frame)}")
        + f" --rounds {first.get('rounds', 5)} --modes "
        + ",".join(modes) + "` then `python -m dynconv.autotune report <folder>/"
        + f"{ODCONV_CSV}`" + (" (`make report` does both)" if first["preset"] == "odconv"
                              else ""), ""]
    if ok.empty:
        return lines + ["No row was measured.", ""]
    fb = ok[ok["mode"] == "fwd+bwd"]
    keys = ["shape", "batch", "experts", "dtype", "layout"]

    def memory_ratios(provider: str) -> list[float]:
        out = []
        for _key, sub in fb.groupby(keys, sort=False):
            extra = sub.set_index("provider")["mem_extra_bytes"]
            if provider in extra and "static" in extra and extra["static"] > 0:
                out.append(extra[provider] / extra["static"])
        return out

    layer_count = len(ok.drop_duplicates(keys))
    lines += [f"Geometric mean over the {layer_count} layers (time or memory / the static "
              "conv's):", ""]
    rows = []
    for provider in providers:
        part = ok[ok["provider"] == provider]
        rows.append([f"`{provider}`"]
                    + [_fmt(_geomean(part[part["mode"] == m]["ratio_to_static"]))
                       for m in modes]
                    + [_fmt(_geomean(memory_ratios(provider)))])
    lines += _table(["provider", *[f"{m} time" for m in modes], "fwd+bwd peak memory"],
                    rows) + [""]
    lines += ["Per layer: static ms, then each provider's ratios (time fwd, time fwd+bwd, "
              "memory); static's peak memory in MiB above the inputs:", ""]
    header = ["layer", "batch", *[f"static {m} ms" for m in modes], "static MiB"]
    for provider in providers:
        header += [f"{words[provider]} {m}" for m in modes] + [f"{words[provider]} mem"]
    rows = []
    for variant in _variants(ok, keys):
        sub = ok[(ok[keys] == pd.Series(variant, index=keys)).all(axis=1)]
        by = {(r["provider"], r["mode"]): r for _, r in sub.iterrows()}
        static_mem = by.get(("static", "fwd+bwd"), {}).get("mem_extra_bytes", float("nan"))
        row = [f"{sub['layer'].iloc[0]} {variant[0]}", str(variant[1])]
        row += [_fmt(by[("static", m)]["time_ms"] if ("static", m) in by else None, 3)
                for m in modes]
        row += [_fmt(static_mem / 2**20, 1)]
        for provider in providers:
            row += [_fmt(by[(provider, m)]["ratio_to_static"] if (provider, m) in by
                         else None) for m in modes]
            extra = by.get((provider, "fwd+bwd"), {}).get("mem_extra_bytes", float("nan"))
            row.append(_memory_ratio(extra, static_mem))
        rows.append(row)
    lines += _table(header, rows) + [""]
    problems = frame[frame["status"] != "ok"][["provider", "status", "note"]].drop_duplicates()
    if not problems.empty:
        lines += ["Not measured:", ""]
        lines += [f"- `{r['provider']}`: {r['status']}: {r['note']}"
                  for _, r in problems.iterrows()]
        lines.append("")
    return lines


def write_odconv_markdown(frame: pd.DataFrame, path: str, folder: str) -> str:
    """``folder``/odconv.md: the ODConv section of the CSV at ``path`` on its own."""
    lines = [f"# dynconv ODConv performance: {frame['device_name'].iloc[0]}", "",
             f"Generated by `python -m dynconv.autotune report` from "
             f"`{os.path.basename(path)}`.", "", *odconv_section(frame, os.path.basename(path))]
    target = os.path.join(folder, "odconv.md")
    with open(target, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return target


def companion_paths(path: str) -> dict[str, str]:
    """setting -> where ``make report`` writes the run with that allocator setting that goes
    with the bench CSV ``path`` (``<root>/<device>/bench_<preset>.csv``): bench's ``--out
    <root>/<COMPANION_FOLDERS[setting]>``, i.e. ``<root>/<folder>/<device>/bench_<preset>.csv``."""
    folder = os.path.dirname(os.path.abspath(path))
    return {setting: os.path.join(os.path.dirname(folder), name, os.path.basename(folder),
                                  os.path.basename(path))
            for setting, name in COMPANION_FOLDERS.items()}


def _load_companion(path: str) -> pd.DataFrame | None:
    """The bench CSV at ``path``, or None (with a message) when there is none or it is not one."""
    if not os.path.isfile(path):
        return None
    try:
        frame = load(path)
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return None
    return None if frame.empty else frame


def render(csv_paths: list[str], out_root: str | None = None,
           explicit: tuple[str, ...] = (), companion_csvs: tuple[str, ...] = ()) -> list[str]:
    """Render every CSV; return the paths written (PNGs and one summary.md per folder).

    A CSV in ``explicit`` (named on the command line) that is not a bench CSV is an error; one
    found by searching a folder is skipped with a message. A CPU run's summary opens with the
    CPU goals (:func:`goals_section`) on it and its companion runs, the same preset with other
    allocator settings: ``companion_csvs`` (default: :func:`companion_paths` of the CSV); a
    companion run found by searching a folder is read there, not rendered on its own.
    """
    def companions_of(path: str) -> list[str]:
        return list(companion_csvs) or list(companion_paths(path).values())

    companions = {os.path.abspath(c) for p in csv_paths for c in companions_of(p)}
    by_folder: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    odconv: dict[str, tuple[str, pd.DataFrame]] = {}  # folder -> its ODConv CSV
    for path in csv_paths:
        if path not in explicit and os.path.abspath(path) in companions:
            continue
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
        if is_odconv(frame):
            odconv[folder] = (path, frame)
            continue
        by_folder.setdefault(folder, []).append((path, frame))
        if folder not in odconv:  # the ODConv run beside this bench CSV, if any
            companion = _load_companion(odconv_companion(path))
            if companion is not None and is_odconv(companion):
                odconv[folder] = (odconv_companion(path), companion)
    written = []
    for folder, (path, frame) in odconv.items():
        os.makedirs(folder, exist_ok=True)
        written.append(write_odconv_markdown(frame, path, folder))
    for folder, frames in by_folder.items():
        os.makedirs(folder, exist_ok=True)
        first = frames[0][1].iloc[0]
        lines = [f"# dynconv performance: {first['device_name']}", "",
                 "Generated by `python -m dynconv.autotune report` from "
                 + ", ".join(f"`{os.path.basename(p)}`" for p, _ in frames) + ".", ""]
        for path, frame in frames:
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
            goals = []
            if frame["device"].iloc[0] == "cpu":
                runs = []
                for companion in companions_of(path):
                    companion_frame = _load_companion(companion)
                    why = ("" if companion_frame is not None else
                           "not a bench CSV with rows" if os.path.isfile(companion)
                           else "no such file (`make report` writes it)")
                    runs.append((os.path.relpath(companion, folder), companion_frame, why))
                goals = goals_section(frame, os.path.basename(path), runs)
            lines += summary_section(frame, images, goals)
        if folder in odconv:
            path, frame = odconv[folder]
            lines += odconv_section(frame, os.path.basename(path))
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
    parser.add_argument("--companion", action="append", default=[], metavar="CSV",
                        help="a bench CSV of the same preset run with another allocator setting "
                             "(bench --allocator), for the CPU goals: the speed rule on each "
                             "that has its cases, one geometric mean per setting "
                             "(repeatable; default: <root>/steady/<device>/bench_<preset>.csv "
                             "and <root>/thp/<device>/bench_<preset>.csv next to each "
                             "<root>/<device>/ CSV, where make report writes them); a missing "
                             "one is said in the summary")
    args = parser.parse_args(argv)
    try:
        csvs = find_csvs(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if not csvs:
        parser.error(f"no bench_*.csv found under {args.paths}")
    try:
        written = render(csvs, args.out, tuple(p for p in args.paths if os.path.isfile(p)),
                         companion_csvs=tuple(args.companion))
    except ValueError as exc:
        parser.error(str(exc))
    for path in written:
        print(f"report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
