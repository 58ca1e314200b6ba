"""``python -m dynconv.autotune onnx``: time the ONNX export forms in onnxruntime (CPU) against the
static model's export, as a deploying user runs them.

For every model (torchvision's ResNet-18 and MobileNetV2, ``weights=None``, BatchNorm running
statistics drawn at random so that folding them is not a no-op), the static model is exported
with plain ``torch.onnx.export`` (onnxruntime folds its BatchNorms into the Convs itself) and a
copy with every ``nn.Conv2d`` converted (``dynconv.convert_conv2d``, K experts) is exported once
per provider:

- ``auto``, ``scan``, ``spanning``, ``matmul``: ``dynconv.export_onnx(..., form=...)``, the
  BatchNorms folded into the banks (``dynconv.fold_batchnorm``);
- ``plain-spanning``: the export before ``dynconv.export_onnx``: plain ``torch.onnx.export`` in
  the spanning form, the BatchNormalization nodes kept;
- ``static-no-nchwc``: the static export again, run without onnxruntime's layout optimisations
  (``ORT_ENABLE_EXTENDED``: BatchNorm and activation fusions kept, no NCHWc Convs). A Conv whose
  weight is an input, as in the per-sample forms, cannot have the NCHWc layout (it needs a
  constant weight), so this is about the best such a form can do.

``--profile`` adds onnxruntime's per-node profile of static and the default form (time by op
type per run; a Scan's time includes the Conv in its body): where the default form's time goes.

Every provider's output is checked against PyTorch at batch 3 (``rel_error``: the largest
difference over the largest value). Timing: one onnxruntime session per provider
(``intra_op_num_threads`` = ``--threads``, all graph optimisations), warmed up; then ``--rounds``
rounds, each one sample of every provider, static included, in an order rotated from round to
round, so that load from other processes hits all providers alike. A sample is back-to-back
runs lasting at least ``--min-sample-ms``, timed on the wall clock and on this process's CPU
clock at once. A provider's figure is the median over the rounds of its sample / the static
sample of the same round.

Output (``--out``, default perf_reports/onnx): ``onnx_<tag>.csv`` (one row per model x batch x
provider), ``onnx_<tag>_rounds.csv`` (every sample), ``onnx_<tag>.png`` (ratio to static, per
model and batch) and ``summary_<tag>.md``; the table is printed too.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import dynconv
from dynconv.export import DEFAULT_FORM, FORMS

from .measure import csv_list, device_name, int_list, versions

MODELS = ("resnet18", "mobilenet_v2")
BEFORE = "plain-spanning"  # the export before dynconv.export_onnx (spanning, BatchNorms kept)
NO_NCHWC = "static-no-nchwc"  # the static export without onnxruntime's layout optimisations
PROVIDERS = (*FORMS, BEFORE, NO_NCHWC)
GOAL = 1.3  # the target ratio for the default form


def build_models(arch: str, experts: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(static, converted) torchvision ``arch`` in eval mode, the same weights and BatchNorms."""
    import torchvision

    torch.manual_seed(seed)
    static = getattr(torchvision.models, arch)(weights=None).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in static.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    converted = dynconv.convert_conv2d(copy.deepcopy(static), experts).eval()
    return static, converted


def export_provider(provider: str, static: nn.Module, converted: nn.Module,
                    example: torch.Tensor, path: str) -> None:
    """Write ``provider``'s ONNX file for the models to ``path``."""
    batch = torch.export.Dim("batch", min=1)
    if provider == "static":
        torch.onnx.export(static, (example,), path, dynamo=True, verbose=False,
                          dynamic_shapes=({0: batch},))
    elif provider == BEFORE:
        with dynconv.onnx_export_form("spanning"):
            torch.onnx.export(converted, (example,), path, dynamo=True, verbose=False,
                              dynamic_shapes=({0: batch},))
    else:
        dynconv.export_onnx(converted, (example,), path, form=provider)


def op_counts(path: str) -> dict:
    """Counts of a few op types over the graph and every subgraph (a Scan's body)."""
    import onnx

    counts = {"Conv": 0, "Scan": 0, "BatchNormalization": 0, "MatMul": 0}
    standard = True

    def walk(graph):
        nonlocal standard
        for node in graph.node:
            standard &= node.domain in ("", "ai.onnx")
            if node.op_type in counts:
                counts[node.op_type] += 1
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                    walk(subgraph)

    walk(onnx.load(path, load_external_data=False).graph)
    return {**{f"{op}_nodes": n for op, n in counts.items()}, "standard_ops_only": standard}


def make_session(path: str, threads: int, layout_optimizations: bool = True,
                 profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not layout_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def profile_by_op(path: str, x, threads: int, runs: int, prefix: str) -> dict[str, float]:
    """ms per run spent in each op type (onnxruntime's profiler, after one warm-up run)."""
    import json

    session = make_session(path, threads, profile_prefix=prefix)
    for _ in range(runs + 1):
        run_once(session, x)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    totals, model_runs = {}, 0
    for event in events:
        if event.get("name") == "model_run":
            model_runs += 1
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3
    # the warm-up run is in the totals too: divide by every run
    return {op: ms / max(model_runs, 1) for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def run_once(session, x) -> None:
    session.run(None, {session.get_inputs()[0].name: x})


def sample(session, x, calls: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) per run, over ``calls`` back-to-back runs."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run_once(session, x)
    return ((time.perf_counter() - wall) * 1e3 / calls, (time.process_time() - cpu) * 1e3 / calls)


def time_interleaved(sessions: dict, x, rounds: int, min_sample_ms: float) -> list[dict]:
    """Per round, one sample of every session (order rotated by one each round)."""
    calls = {}
    for name, session in sessions.items():
        run_once(session, x)  # warm-up: first-run allocations and prepacking
        once = sample(session, x, 1)[0]
        calls[name] = max(1, math.ceil(min_sample_ms / max(once, 1e-3)))
    names, samples = list(sessions), []
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            wall_ms, cpu_ms = sample(sessions[name], x, calls[name])
            samples.append({"round": r, "provider": name, "calls": calls[name],
                            "ms_wall": wall_ms, "ms_process": cpu_ms})
    return samples


def summarise(samples: list[dict], provider: str) -> dict:
    """Medians of a provider's samples and of its per-round ratios to static."""
    mine = {s["round"]: s for s in samples if s["provider"] == provider}
    static = {s["round"]: s for s in samples if s["provider"] == "static"}
    row = {}
    for clock in ("wall", "process"):
        key = f"ms_{clock}"
        row[key] = statistics.median(s[key] for s in mine.values())
        row[f"ratio_{clock}"] = statistics.median(
            mine[r][key] / static[r][key] for r in mine if static[r][key] > 0)
    return row


def relative_error(session, model: nn.Module, x: torch.Tensor) -> float:
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    return float((torch.from_numpy(got) - want).abs().max() / want.abs().max())


def measure_model(arch: str, args, workdir: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(summary rows, every sample, profile rows) of one model."""
    static, converted = build_models(arch, args.experts)
    example = torch.randn(2, 3, args.size, args.size)
    providers = ["static", *args.providers]
    paths, info = {}, {}
    for provider in providers:
        if provider == NO_NCHWC:
            paths[provider], info[provider] = paths["static"], info["static"]
            continue
        paths[provider] = os.path.join(workdir, f"{arch}_{provider}.onnx")
        start = time.perf_counter()
        export_provider(provider, static, converted, example, paths[provider])
        info[provider] = {"export_s": round(time.perf_counter() - start, 1),
                          "file_mb": round(_file_mb(paths[provider]), 1),
                          **op_counts(paths[provider])}
        print(f"{arch}: exported {provider} in {info[provider]['export_s']} s", flush=True)
    sessions = {p: make_session(paths[p], args.threads, layout_optimizations=p != NO_NCHWC)
                for p in providers}
    check = torch.randn(3, 3, args.size, args.size)
    for provider in providers:
        info[provider] = dict(info[provider])
        reference = static if provider in ("static", NO_NCHWC) else converted
        info[provider]["rel_error"] = relative_error(sessions[provider], reference, check)
    rows, raw, profiles = [], [], []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size).numpy()
        samples = time_interleaved(sessions, x, args.rounds, args.min_sample_ms)
        common = {"model": arch, "size": args.size, "experts": args.experts, "batch": batch}
        raw += [{**common, **s} for s in samples]
        for provider in providers:
            rows.append({**common, "provider": provider, **summarise(samples, provider),
                         "rounds": args.rounds, **info[provider], "threads": args.threads,
                         "default_form": DEFAULT_FORM})
        cells = " ".join(f"{r['provider']}={r['ratio_wall']:.2f}" for r in rows[-len(providers):])
        print(f"{arch} {args.size}px B={batch} static {rows[-len(providers)]['ms_wall']:.1f} ms "
              f"| ratio (wall) {cells}", flush=True)
        if args.profile:
            for provider in ("static", DEFAULT_FORM):
                prefix = os.path.join(workdir, f"profile_{arch}_{provider}_{batch}")
                for op, ms in profile_by_op(paths[provider], x, args.threads, 3, prefix).items():
                    profiles.append({**common, "provider": provider, "op_type": op,
                                     "ms_per_run": ms})
    return rows, raw, profiles


def _file_mb(path: str) -> float:
    data = path + ".data"
    return (os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)) / 1e6


def markdown_table(rows: list[dict], clock: str = "wall") -> str:
    """Ratio to the static export per model x batch (rows) and provider (columns); bold: the
    fastest export form (``plain-spanning`` and ``static-no-nchwc`` are references)."""
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "static"))
    lines = ["| model | px | batch | static ms | " + " | ".join(providers) + " |",
             "|---|---|---|---|" + "---|" * len(providers)]
    keys = list(dict.fromkeys((r["model"], r["size"], r["batch"]) for r in rows))
    for model, size, batch in keys:
        group = {r["provider"]: r for r in rows
                 if (r["model"], r["size"], r["batch"]) == (model, size, batch)}
        best = min((group[p][f"ratio_{clock}"] for p in providers if p in FORMS), default=None)
        cells = []
        for p in providers:
            ratio = group[p][f"ratio_{clock}"]
            cells.append(f"**{ratio:.2f}x**" if ratio == best else f"{ratio:.2f}x")
        lines.append(f"| {model} | {size} | {batch} | {group['static'][f'ms_{clock}']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict]) -> str:
    run = rows[0]
    return (f"# ONNX forms vs the static export ({run['size']}x{run['size']}, K = "
            f"{run['experts']})\n\n`{run['command']}` on {run['cpu']}, {run['threads']} "
            f"onnxruntime thread(s), onnxruntime {run['onnxruntime']}, torch {run['torch']}, "
            f"commit {run['commit']}.\n\nRatio to the static export (wall clock, median of the "
            f"per-round ratios of {run['rounds']} interleaved rounds; bold: the fastest form). "
            f"Default form: `{run['default_form']}`.\n\n{markdown_table(rows)}\n")


def plot(rows: list[dict], path: str, clock: str = "wall") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "static"))
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.5 * len(models), 8), 4.8),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            ratios = [next(r[f"ratio_{clock}"] for r in rows if r["model"] == model
                           and r["batch"] == b and r["provider"] == provider) for b in batches]
            positions = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(batches))]
            reference = provider not in FORMS  # plain-spanning, static-no-nchwc
            bars = ax.bar(positions, ratios, width, label=provider,
                          hatch="//" if reference else None, alpha=0.6 if reference else 1.0)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(GOAL, color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL}x")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        size = next(r["size"] for r in rows if r["model"] == model)
        ax.set_title(f"{model}, {size}x{size}, K={rows[0]['experts']}")
        ax.set_ylabel(f"onnxruntime time / static export ({clock} clock)")
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"ONNX export forms in onnxruntime CPU, {rows[0]['threads']} thread(s)\n"
                 f"ratio to the static export, median of {rows[0]['rounds']} interleaved rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynconv.autotune onnx",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--models", type=csv_list(MODELS, "model"), default=list(MODELS))
    parser.add_argument("--providers", type=csv_list(PROVIDERS, "provider"),
                        default=list(PROVIDERS),
                        help=f"comma-separated from {list(PROVIDERS)} (static is always timed)")
    parser.add_argument("--batches", type=int_list("--batches"), default=[1, 8])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--experts", type=int, default=4, help="K of every converted conv")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--min-sample-ms", type=float, default=200.0)
    parser.add_argument("--out", default="perf_reports/onnx")
    parser.add_argument("--tag", default="", help="file name suffix (default: <size>px)")
    parser.add_argument("--workdir", default=None,
                        help="where the .onnx files go (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile static and the default form by op type")
    parser.add_argument("--table", default=None, metavar="CSV",
                        help="redraw the PNG and summary of a CSV written earlier (beside it), "
                             "print its table, then exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        with open(args.table) as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        write_figures(rows, os.path.dirname(args.table),
                      os.path.basename(args.table)[len("onnx_"):-len(".csv")])
        print(markdown_table(rows))
        return 0
    tag = args.tag or f"{args.size}px"
    rows, raw, profiles = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        os.makedirs(workdir, exist_ok=True)
        for arch in args.models:
            model_rows, model_raw, model_profiles = measure_model(arch, args, workdir)
            rows += model_rows
            raw += model_raw
            profiles += model_profiles
    import onnxruntime

    command = "python -m dynconv.autotune onnx " + " ".join(
        sys.argv[1:] if argv is None else argv)
    run = {"cpu": device_name("cpu"), "onnxruntime": onnxruntime.__version__, **versions(),
           "command": command.strip()}
    rows = [{**row, **run} for row in rows]
    _write_csv(os.path.join(args.out, f"onnx_{tag}.csv"), rows)
    _write_csv(os.path.join(args.out, f"onnx_{tag}_rounds.csv"), raw)
    if profiles:
        _write_csv(os.path.join(args.out, f"onnx_{tag}_profile.csv"), profiles)
    write_figures(rows, args.out, tag)
    print("\n" + markdown_table(rows))
    return 0


def write_figures(rows: list[dict], out: str, tag: str) -> None:
    """``onnx_<tag>.png`` and ``summary_<tag>.md`` in ``out``."""
    plot(rows, os.path.join(out, f"onnx_{tag}.png"))
    with open(os.path.join(out, f"summary_{tag}.md"), "w") as f:
        f.write(summary_markdown(rows))


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    sys.exit(main())
