"""``python -m dynconv.autotune cpu-formulations``: measure the native CPU formulations.

The benchmark behind :mod:`dynconv.backends.native.rule` (which formulation the native backend
runs for a shape and thread count) and behind ``perf_reports/cpu_native/``.

For every case (``--set issue``: a table of wide 3x3 layers at K = 4 and 8; ``quick``: the
CPU shape set of ``bench --preset quick``; ``all``: both) and every provider, forward and
forward+backward are timed, each *interleaved* with the static ``F.conv2d`` of the same shape
(:meth:`dynconv.autotune.measure.Timer.interleaved`); the figure kept is the median of the
per-round ratios provider / static. Providers:

- ``loop`` and ``grouped``: the plain-autograd baselines (``backend="loop"`` / ``"grouped"``);
- ``native:<formulation>[@chunk]``: the native op with its formulation (and chunk size) forced;
- ``auto``: ``backend="auto"``, i.e. the native op with the rule's choice;
- ``auto:recompute``: the same, with the backward always mixing the weights again (never
  keeping the forward's small ones: ``native.recompute_mixed_weights``).

``--parts`` times each formulation's forward, input gradient and weight gradient alone (the
rule's evidence). With ``--memory``, each provider's forward+backward runs once in a fresh
process instead (:func:`dynconv.autotune.measure.fresh_process_peak_rss`), and the figure is its
peak RSS minus its RSS just before the run.

Output: ``<out>/cpu_formulations.csv`` (long format, one row per case x threads x provider x
mode), ``<out>/cpu_parts.csv`` or ``<out>/cpu_memory.csv``, every row with the git commit; a
summary table is printed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import statistics
import sys
from dataclasses import replace

import torch

from dynconv.backends.native import op as native
from dynconv.backends.native.formulations import FORMULATIONS, conv_backward, conv_forward
from dynconv.backends.native.rule import FormulationPlan, choose_formulations

from .bench import DTYPES, Case, forward_fn, fwd_bwd_run, make_inputs, mode_fn, preset_cases
from .measure import CLOCKS, Timer, fresh_process_peak_rss, git_commit
from .shapes import ConvShape

BASELINES = ("loop", "grouped")
MODES = ("fwd", "fwd+bwd")


def issue_cases() -> list[Case]:
    """The ``issue`` set: fp32, 3x3, stride 1, Cin = Cout = C, K = 4 and 8."""
    cases = []
    for batch, channels, size in ((32, 64, 32), (64, 128, 16), (16, 256, 14), (128, 64, 8)):
        shape = ConvShape(f"c{channels}@{size}", channels, channels, size, size, 3, 3, 1, 1)
        cases += [Case("issue", shape, batch, experts=k) for k in (4, 8)]
    return cases


def quick_cases() -> list[Case]:
    """The perf harness's CPU shape set (``bench --preset quick``), duplicates removed."""
    seen, cases = set(), []
    for case in preset_cases("quick", "cpu"):
        if case.key() not in seen:
            seen.add(case.key())
            cases.append(replace(case, memory=False))
    return cases


def case_set(name: str) -> list[Case]:
    if name == "issue":
        return issue_cases()
    if name == "quick":
        return quick_cases()
    if name == "all":
        return issue_cases() + quick_cases()
    raise ValueError(f"--set must be one of issue, quick, all; got {name!r}")


def selected_cases(name: str, label_filter: str = ""):
    """(label, case) of the cases of set ``name`` whose label contains ``label_filter``."""
    for case in case_set(name):
        label = f"B{case.batch} {case.shape.label()} K{case.experts} {case.dtype} {case.layout}"
        if label_filter in label:
            yield label, case


def parse_provider(provider: str) -> tuple[str, tuple[str, ...] | None, int | None]:
    """``loop`` / ``grouped`` / ``auto`` / ``native:<formulation>[@chunk]`` -> parts.

    ``<formulation>`` is one name for every part or ``<forward>/<input_grad>/<weight_grad>``.
    """
    if provider in BASELINES or provider in ("auto", "auto:recompute"):
        return provider, None, None
    kind, _, rest = provider.partition(":")
    formulation, _, chunk = rest.partition("@")
    names = tuple(formulation.split("/"))
    if (kind != "native" or len(names) not in (1, 3) or any(n not in FORMULATIONS for n in names)
            or (chunk and not chunk.isdigit())):
        raise ValueError(
            f"provider must be loop, grouped, auto, auto:recompute or native:<f>[@chunk] or "
            f"native:<f>/<f>/<f>[@chunk] with f one of {FORMULATIONS}, got {provider!r}"
        )
    return "native", names * (3 // len(names)), int(chunk) if chunk else None


def provider_forward(provider: str, case: Case, tensors: dict):
    """(forward, leaves) of a provider (or of ``static``, the static conv); a native one runs
    inside force_formulation."""
    if provider == "static":
        return forward_fn("static", case, tensors)
    kind, formulation, chunk = parse_provider(provider)
    if kind in BASELINES:
        return forward_fn(kind, case, tensors)
    forward, leaves = forward_fn("auto", case, tensors)
    if kind == "auto":
        return forward, leaves
    if kind == "auto:recompute":

        def recompute():
            with native.recompute_mixed_weights():
                return forward()

        return recompute, leaves

    def forced():
        with native.force_formulation(formulation, chunk):
            return forward()

    return forced, leaves


def rule_choice(case: Case, threads: int) -> FormulationPlan:
    """The rule's formulation of each part for this case and thread count."""
    s = case.shape
    return choose_formulations(
        case.batch, s.cin, s.cout, (s.h, s.w), (s.kh, s.kw), (s.ho, s.wo), s.groups,
        DTYPES[case.dtype], case.layout == "channels_last", threads, (s.stride, s.stride),
    )


def case_columns(case: Case) -> dict:
    s = case.shape
    return {
        "shape": s.label(), "batch": case.batch, "cin": s.cin, "cout": s.cout, "h": s.h,
        "w": s.w, "k": s.kh, "stride": s.stride, "groups": s.groups, "experts": case.experts,
        "dtype": case.dtype, "layout": case.layout,
    }


def timing_columns(static_fn, fn, rounds: int, clock: str) -> dict:
    """``fn`` timed interleaved with ``static_fn`` over ``rounds`` rounds on ``clock``: the
    median times, the median of the per-round ratios fn / static_fn and the ratio of the
    minimums (the columns every timing CSV of this module shares)."""
    timing = Timer("cpu", clock).interleaved(fn, static_fn, rounds)
    return {"time_ms": timing.time_ms, "static_ms": timing.static_ms, "ratio": timing.ratio,
            "ratio_of_mins": timing.ratio_of_mins}


def measure(case: Case, providers: list[str], threads: int, rounds: int, modes,
            clock: str = "wall", reference: str = "static") -> list[dict]:
    """Rows of one case: median ratio to the static conv, interleaved run by run.

    ``clock="process"`` times CPU time of this process instead of wall time: with one thread it
    does not count the time other processes hold the core (a shared machine), with more it also
    counts OpenMP threads waiting at barriers. ``reference`` is what each provider is
    interleaved with and divided by: the static conv (default) or another provider (e.g.
    ``grouped``: then the ratio compares the two directly, without the static conv's own
    sensitivity to what ran just before it; the ``static_ms`` column is then that provider's).
    """
    torch.set_num_threads(threads)
    tensors = make_inputs(case, "cpu")
    static_forward, static_leaves = provider_forward(reference, case, tensors)
    rows = []
    for mode in modes:
        static_fn = mode_fn(mode, static_forward, static_leaves)
        for provider in providers:
            forward, leaves = provider_forward(provider, case, tensors)
            fn = mode_fn(mode, forward, leaves)
            rows.append({
                **case_columns(case), "threads": threads, "clock": clock, "provider": provider,
                "reference": reference, "mode": mode,
                **timing_columns(static_fn, fn, rounds, clock),
                "rule": "/".join(rule_choice(case, threads)), "commit": git_commit(),
            })
    return rows


# ---------------------------------------------------------------------------------------------
# per part: forward, input gradient and weight gradient of each formulation

PARTS = ("fwd", "dx", "dw")


def measure_parts(case: Case, threads: int, rounds: int, clock: str = "wall") -> list[dict]:
    """Rows of one case: each formulation's forward, input gradient and weight gradient alone.

    The per-sample weights are mixed once up front and every part runs on the whole batch as
    one chunk, so a row times only the convolution work of that part; its static reference is
    the same part of the static conv (``F.conv2d``, or ``convolution_backward`` with one output
    requested), interleaved run by run. These rows are the evidence of
    :mod:`dynconv.backends.native.rule`, which picks a formulation per part.
    """
    torch.set_num_threads(threads)
    t = make_inputs(case, "cpu")
    s = case.shape
    x, weight, bank, routing = (t[name].detach() for name in ("x", "weight", "bank", "routing"))
    weights = (routing @ bank.reshape(bank.shape[0], -1)).view((case.batch,) + bank.shape[1:])
    geometry = ([s.stride] * 2, [s.padding] * 2, [s.dilation] * 2)
    grad_out = torch.randn_like(torch.nn.functional.conv2d(x, weight, None, *geometry, s.groups))

    def static_part(part):
        if part == "fwd":
            return lambda: torch.nn.functional.conv2d(x, weight, None, *geometry, s.groups)
        mask = [part == "dx", part == "dw", False]
        return lambda: torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, *geometry, False, [0, 0], s.groups, mask)

    def dynamic_part(part, formulation):
        if part == "fwd":
            return lambda: conv_forward(formulation, x, weights, None, *geometry, s.groups)
        return lambda: conv_backward(formulation, grad_out, x, weights, *geometry, s.groups,
                                     part == "dx", part == "dw")

    rows = []
    for part in PARTS:
        static_fn = static_part(part)
        for formulation in FORMULATIONS:
            fn = dynamic_part(part, formulation)
            rows.append({
                **case_columns(case), "threads": threads, "clock": clock,
                "formulation": formulation, "part": part,
                **timing_columns(static_fn, fn, rounds, clock),
                "rule": rule_choice(case, threads)[PARTS.index(part)], "commit": git_commit(),
            })
    return rows


def parts_markdown_table(path: str) -> str:
    """A markdown table of a parts CSV: per case, each part's ratio for every formulation."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cases: dict[tuple, dict[tuple, dict]] = {}
    for r in rows:
        key = (r["shape"], r["batch"], r["experts"], r["dtype"], r["layout"], r["threads"])
        cases.setdefault(key, {})[(r["part"], r["formulation"])] = r
    head = ["shape", "B", "K", "dtype", "layout", "threads"]
    for part in PARTS:
        head += [f"{part} {f}" for f in FORMULATIONS] + [f"{part} rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, cells in cases.items():
        row = list(key)
        for part in PARTS:
            row += [f"{float(cells[(part, f)]['ratio']):.2f}" if (part, f) in cells else ""
                    for f in FORMULATIONS]
            row.append(cells[(part, FORMULATIONS[0])]["rule"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# peak memory in a fresh process


def fresh_process_memory(case: Case, provider: str, threads: int) -> dict:
    """Peak RSS of one forward+backward of ``provider`` (or ``static``) in a fresh process:
    the columns of the memory CSV. Raises RuntimeError if it cannot be measured."""
    result = fresh_process_peak_rss(functools.partial(fwd_bwd_run, forward=provider_forward),
                                    (case, provider), threads, timeout_s=600.0)
    if result.status != "ok" or result.extra_bytes is None:
        raise RuntimeError(f"memory of {provider} could not be measured: {result.note}")
    return {"peak_rss_bytes": result.peak_bytes, "extra_bytes": result.extra_bytes,
            "rss_before_bytes": result.rss_before_bytes}


# ---------------------------------------------------------------------------------------------
# CLI


def _write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summary(rows: list[dict], mode: str) -> str:
    """One line per case and thread count: every provider's ratio, the rule's pick, the best."""
    lines = []
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["mode"] == mode:
            key = (row["shape"], row["batch"], row["experts"], row["dtype"], row["layout"],
                   row["threads"])
            by_case.setdefault(key, {})[row["provider"]] = row
    for key, providers in by_case.items():
        cells = " ".join(f"{p}={r['ratio']:.2f}" for p, r in providers.items())
        rule = next(iter(providers.values()))["rule"]
        lines.append(f"{key} rule={rule} | {cells}")
    return "\n".join(lines)


def markdown_table(path: str, mode: str = "fwd+bwd") -> str:
    """A markdown table of a cpu_formulations CSV: one row per case and thread count."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == mode]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["shape"], r["batch"], r["experts"], r["dtype"], r["layout"], r["threads"])
        cases.setdefault(key, {})[r["provider"]] = r
    head = ["shape", "B", "K", "dtype", "layout", "threads", "rule", *providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_provider in cases.items():
        rule = next(iter(by_provider.values()))["rule"]
        cells = [f"{float(by_provider[p]['ratio']):.2f}" if p in by_provider else ""
                 for p in providers]
        lines.append("| " + " | ".join([*key, rule, *cells]) + " |")
    return "\n".join(lines)


# The CPU speed goal: auto at most this fraction above the better of loop and the trick,
# or at most this many ms per call above it (the accepted cost of a Python autograd.Function).
GOAL_FRACTION = 0.05
GOAL_MS = 0.2


def within_goal(auto_ratio: float, best_ratio: float, reference_ms: float) -> bool:
    """The CPU speed rule on ratios to one reference (whose time is ``reference_ms``): auto within
    5 % or within 0.2 ms per call of the better baseline."""
    return (auto_ratio <= (1 + GOAL_FRACTION) * best_ratio
            or (auto_ratio - best_ratio) * reference_ms <= GOAL_MS + 1e-9)


def goal_summary(path: str, mode: str = "fwd+bwd") -> str:
    """The native path's speed goals on a CSV of loop, grouped and auto: how many cases have
    auto at most the better baseline, at most 5 % above it, and within the CPU speed rule (5 % or
    0.2 ms per call: :func:`within_goal`, the ms from the ratios and the reference's median
    time); with ratios to the static conv also how many are at most 1.6x and 1.3x static. A
    CSV timed against a provider (``--reference grouped``) has that provider's ratio 1 by
    definition."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == mode]
    reference = rows[0].get("reference") or "static" if rows else "static"
    cases: dict[tuple, dict[str, float]] = {}
    reference_ms: dict[tuple, float] = {}
    for r in rows:
        key = (r["shape"], r["batch"], r["experts"], r["dtype"], r["layout"], r["threads"])
        cases.setdefault(key, {})[r["provider"]] = float(r["ratio"])
        if r["provider"] == "auto":
            reference_ms[key] = float(r["static_ms"])
        if reference != "static":
            cases[key][reference] = 1.0
    cases = {k: v for k, v in cases.items() if {"loop", "grouped", "auto"} <= set(v)}
    if not cases:
        return f"{mode}: no case has loop, grouped and auto"
    losses = [(k, v) for k, v in cases.items() if v["auto"] > min(v["loop"], v["grouped"])]
    within = sum(v["auto"] <= 1.05 * min(v["loop"], v["grouped"]) for v in cases.values())
    goal = sum(within_goal(v["auto"], min(v["loop"], v["grouped"]), reference_ms[k])
               for k, v in cases.items())
    unit = "static" if reference == "static" else f"the {reference} provider"
    summary = (f"{mode}, {len(cases)} cases (ratios to {unit}): auto at most the better "
               f"baseline on {len(cases) - len(losses)}, within 5 % of it on {within}, "
               f"within 5 % or 0.2 ms on {goal}")
    if reference == "static":
        summary += (f", at most 1.6x static on {sum(v['auto'] <= 1.6 for v in cases.values())}"
                    f", at most 1.3x on {sum(v['auto'] <= 1.3 for v in cases.values())}")
    means = ", ".join(f"{p} {statistics.geometric_mean(v[p] for v in cases.values()):.2f}"
                      for p in ("auto", "grouped", "loop"))
    lines = [f"{summary}; geometric mean {means}.",
             "Cases where auto is slower than the better baseline:"]
    for key, v in losses:
        shape, batch, k, dtype, layout, threads = key
        best = min(v["loop"], v["grouped"])
        outside = "" if within_goal(v["auto"], best, reference_ms[key]) else ", outside the goal"
        lines.append(f"- B{batch} {shape} K{k} {dtype} {layout}, {threads} thread(s): "
                     f"{v['auto']:.2f} against {best:.2f} "
                     f"({100 * (v['auto'] / best - 1):.0f}% slower, "
                     f"{(v['auto'] - best) * reference_ms[key]:.2f} ms{outside})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynconv.autotune cpu-formulations",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--set", default="all", help="issue, quick or all (default)")
    parser.add_argument("--providers", default=",".join(
        list(BASELINES) + [f"native:{f}" for f in FORMULATIONS] + ["auto"]),
        help="comma-separated: loop, grouped, auto, auto:recompute, "
             "native:<formulation>[@chunk]")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated thread counts (default: torch's current)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or process CPU time (robust with --threads 1)")
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    parser.add_argument("--reference", default="static",
                        help="what every provider is interleaved with and divided by: static "
                             "(default) or a provider (e.g. grouped, for a direct comparison)")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of static, loop, grouped and auto at B=64, C=128, 16x16, "
                             "K=4 (one fresh process each) instead of timings")
    parser.add_argument("--out", default="perf_reports/cpu_native")
    parser.add_argument("--tag", default="", help="suffix of the CSV file name")
    parser.add_argument("--table", default=None, metavar="CSV",
                        help="print a markdown table of a CSV written earlier, then exit")
    parser.add_argument("--parts", action="store_true",
                        help="time each formulation's forward, input gradient and weight "
                             "gradient alone (the rule's evidence) instead of the providers")
    args = parser.parse_args(argv)
    if args.table is not None and args.parts:
        print(parts_markdown_table(args.table))
        return 0
    if args.table is not None:
        for mode in [m for m in args.modes.split(",") if m]:
            print(f"\n{mode}: ratio to the reference (the static conv unless the CSV's "
                  f"reference column says otherwise; median of interleaved rounds)\n")
            print(markdown_table(args.table, mode))
            print("\n" + goal_summary(args.table, mode))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    providers = [p for p in args.providers.split(",") if p]
    for provider in providers:
        parse_provider(provider)
    if args.reference != "static":
        parse_provider(args.reference)
    suffix = f"_{args.tag}" if args.tag else ""
    if args.memory:
        shape = ConvShape("c128@16", 128, 128, 16, 16, 3, 3, 1, 1)
        case = Case("memory", shape, 64, experts=4)
        rows = []
        for t in threads:
            for provider in ["static"] + providers:
                result = fresh_process_memory(case, provider, t)
                rows.append({**case_columns(case), "threads": t, "provider": provider,
                             "method": "fresh process VmHWM - VmRSS before", **result,
                             "commit": git_commit()})
                print(f"threads={t} {provider:>22}: +{result['extra_bytes'] / 2**20:7.1f} MiB",
                      flush=True)
        _write_csv(os.path.join(args.out, f"cpu_memory{suffix}.csv"), rows)
        return 0
    if args.parts:
        rows = []
        for label, case in selected_cases(args.set, args.filter):
            for t in threads:
                case_rows = measure_parts(case, t, args.rounds, args.clock)
                rows += case_rows
                cells = " ".join(f"{r['part']}:{r['formulation']}={r['ratio']:.2f}"
                                 for r in case_rows)
                print(f"{label} threads={t}: {cells}", flush=True)
        _write_csv(os.path.join(args.out, f"cpu_parts{suffix}.csv"), rows)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for label, case in selected_cases(args.set, args.filter):
        for t in threads:
            case_rows = measure(case, providers, t, args.rounds, modes, args.clock,
                                args.reference)
            rows += case_rows
            cells = " ".join(
                f"{r['provider']}={r['ratio']:.2f}" for r in case_rows if r["mode"] == modes[-1]
            )
            print(f"{label} threads={t} [{modes[-1]}] rule={case_rows[0]['rule']}: {cells}",
                  flush=True)
    _write_csv(os.path.join(args.out, f"cpu_formulations{suffix}.csv"), rows)
    for mode in modes:
        print(f"\n== {mode} (ratio to static conv, median of interleaved rounds)")
        print(_summary(rows, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
