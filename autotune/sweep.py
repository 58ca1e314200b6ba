"""``python -m dynconv.autotune sweep``: tune the Triton kernels and persist the winners.

For every layer of a named shape set (or ``--shape``) x batch size x dtype x layout and every
Triton kernel, each candidate config is run *through the real launcher* (forced with
:func:`dynconv.kernels.tuned_table.forcing`), checked against the ``native`` backend and
timed; the fastest correct one is stored under the exact autotune key the launcher produced, in
``<out>/<device>.json`` (default: the user's cache folder, ``~/.cache/dynconv/tuned``, which the
kernels read before the package's tables), together with the Triton / torch versions and every
candidate's time. Then, with the tuned configs, every forward and backward strategy of the
``triton`` backend is timed on the layer (:mod:`dynconv.backends.triton.strategy`, as benchmark
mode times them) and the fastest is stored in the table's ``strategies`` section, which ``auto``
reads first.

On a GPU, candidates are timed with ``triton.testing.do_bench`` (median). Without CUDA the sweep
refuses (exit status 2), unless ``--interpreter`` asks for the miniature run under Triton's
interpreter (``TRITON_INTERPRET=1``) with a CPU timer: the numbers mean nothing, but the whole
write-then-load cycle runs (the tool's own test).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .bench import DTYPES, LAYOUTS
from .measure import Timer, csv_list, int_list, progress, shape_arg
from .shapes import SHAPE_SETS, ConvShape, geometry_key, get_shape_set, tiny


@dataclass(frozen=True)
class KernelSpec:
    """A tunable kernel: where its wrapped autotuner lives, its candidates, how to drive it."""

    module: str
    attr: str
    configs: str  # name of the candidate-config function (called with interpreter=False)
    variants: tuple[str, ...]
    direction: str  # "forward" or "backward"
    # (item, tensors, interpreter) -> whether the kernel can run the item at all (None: always)
    applies: Callable[..., bool] | None = None


def _tma_applies(item: Item, t: dict, interpreter: bool) -> bool:
    """The TMA forward runs only where TMA can address the convolution (see conv_fwd_tma)."""
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma_supported

    s = item.shape
    return conv_fwd_tma_supported(t["x"], t["bank"].shape, (s.stride, s.stride), s.groups,
                                  interpreter)


KERNELS = {
    "conv_fwd": KernelSpec("dynconv.kernels.conv_fwd", "conv_fwd_tuned",
                           "dynconv.kernels.configs:conv_fwd_configs",
                           ("premix", "fused"), "forward"),
    "conv_fwd_spanning": KernelSpec("dynconv.kernels.conv_fwd_spanning",
                                    "conv_fwd_spanning_tuned",
                                    "dynconv.kernels.configs:conv_fwd_spanning_configs",
                                    ("spanning",), "forward"),
    "conv_fwd_tma": KernelSpec("dynconv.kernels.conv_fwd_tma", "conv_fwd_tma_tuned",
                               "dynconv.kernels.configs:conv_fwd_tma_configs",
                               ("premix_tma",), "forward", applies=_tma_applies),
    "mix": KernelSpec("dynconv.kernels.mix", "mix_tuned",
                      "dynconv.kernels.configs:mix_configs", ("premix",), "forward"),
    "conv_bwd_dx": KernelSpec("dynconv.kernels.conv_bwd_dx", "conv_bwd_dx_tuned",
                              "dynconv.kernels.configs:conv_bwd_dx_configs", ("dgrad",),
                              "backward"),
    "conv_bwd_dw": KernelSpec("dynconv.kernels.conv_bwd_dw", "conv_bwd_dw_tuned",
                              "dynconv.kernels.configs:conv_bwd_dw_configs", ("wgrad",),
                              "backward"),
}
# relative error (max |out - ref| / max |ref|) above which a candidate's output is wrong
TOLERANCE = {"fp32": 2e-2, "bf16": 6e-2, "fp16": 2e-2}


@dataclass(frozen=True)
class Item:
    shape: ConvShape
    batch: int
    experts: int
    dtype: str
    layout: str


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def hooked_kernel(spec: KernelSpec):
    """The kernel's :class:`TunedKernel`, wrapping it in place if the module has no hook yet.

    Returns (kernel, note); note says when the sweep installed the wrapper itself.
    """
    from dynconv.kernels import tuned_table

    module = importlib.import_module(spec.module)
    kernel = getattr(module, spec.attr)
    if isinstance(kernel, tuned_table.TunedKernel):
        return kernel, ""
    name = next(n for n, s in KERNELS.items() if s == spec)
    wrapped = tuned_table.with_tuned_table(name, kernel)
    setattr(module, spec.attr, wrapped)
    return wrapped, f"{spec.module}.{spec.attr} has no tuned-table hook; wrapped for this run"


def make_tensors(item: Item, device: str, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[item.dtype]
    s = item.shape
    fan_in = (s.cin // s.groups) * s.kh * s.kw

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device=device, dtype=dtype)

    x = rand(item.batch, s.cin, s.h, s.w)
    if item.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    routing = torch.softmax(torch.randn(item.batch, item.experts, generator=generator), dim=1)
    grad_out = rand(item.batch, s.cout, s.ho, s.wo)
    if item.layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return {"x": x, "bank": rand(item.experts, s.cout, s.cin // s.groups, s.kh, s.kw,
                                 scale=fan_in ** -0.5),
            "bias": rand(item.experts, s.cout, scale=0.1),
            "routing": routing.to(device=device, dtype=dtype), "grad_out": grad_out}


def reference(item: Item, t: dict) -> dict:
    """Forward output and gradients from the ``native`` backend, in fp32."""
    import torch

    from dynconv import dynamic_conv2d

    s = item.shape
    leaves = {k: t[k].float().requires_grad_(True) for k in ("x", "bank", "routing", "bias")}
    y = dynamic_conv2d(leaves["x"], leaves["bank"], leaves["routing"], leaves["bias"], s.stride,
                       s.padding, s.dilation, s.groups, backend="native")
    grads = torch.autograd.grad(y, [leaves[k] for k in ("x", "bank", "routing", "bias")],
                                t["grad_out"].float())
    return {"y": y.detach(), "grad_x": grads[0], "grad_bank": grads[1],
            "grad_routing": grads[2], "grad_bias": grads[3]}


def driver(kernel_name: str, variant: str, item: Item, t: dict,
           interpreter: bool) -> Callable[[], dict]:
    """A zero-argument call of the real launcher that exercises ``kernel_name``."""
    s = item.shape
    pair = lambda v: (v, v)  # noqa: E731
    stride, padding, dilation = pair(s.stride), pair(s.padding), pair(s.dilation)
    if KERNELS[kernel_name].direction == "forward":
        from dynconv.backends.triton.forward import triton_forward_impl

        return lambda: {"y": triton_forward_impl(t["x"], t["bank"], t["routing"], t["bias"],
                                                 stride, padding, dilation, s.groups,
                                                 strategy=variant)}
    if kernel_name == "conv_bwd_dx":
        from dynconv.kernels.conv_bwd_dx import conv_bwd_dx

        return lambda: {"grad_x": conv_bwd_dx(t["grad_out"], t["bank"], t["routing"],
                                              tuple(t["x"].shape), stride, padding, dilation,
                                              s.groups, interpreter=interpreter)}
    from dynconv.kernels.conv_bwd_dw import conv_bwd_dw

    def wgrad():
        bank, routing, bias = conv_bwd_dw(t["grad_out"], t["x"], t["bank"], t["routing"],
                                          t["bias"], stride, padding, dilation, s.groups,
                                          interpreter=interpreter)
        return {"grad_bank": bank, "grad_routing": routing, "grad_bias": bias}

    return wgrad


def relative_error(out: dict, ref: dict) -> float:
    worst = 0.0
    for name, value in out.items():
        expected = ref[name]
        scale = float(expected.abs().max()) or 1.0
        worst = max(worst, float((value.float() - expected).abs().max()) / scale)
    return worst


def time_call(fn: Callable, device: str, reps: int = 3) -> float:
    """Median ms of ``fn``, just called once (no warm-up here): on a GPU one ``do_bench`` median
    over 20 ms (5 ms of warm-up), otherwise the median of ``reps`` wall-clock calls."""
    return Timer(device, rep_ms=20.0).median(fn, 1 if device == "cuda" else reps)


def tune_one(kernel_name: str, kernel, item: Item, device: str, interpreter: bool,
             t: dict, ref: dict, reps: int = 3) -> dict[str, dict]:
    """Entries {key: entry} for one kernel and one item, every variant of the kernel.

    Launches are forced and entries filed under ``kernel.name``: the name the kernel module's
    hook gave its wrapper, which is what run-time lookups use.
    """
    from dynconv.kernels import tuned_table

    spec = KERNELS[kernel_name]
    if spec.applies is not None and not spec.applies(item, t, interpreter):
        return {}
    candidates = _resolve(spec.configs)(interpreter=False)
    entries: dict[str, dict] = {}
    for variant in spec.variants:
        run = driver(kernel_name, variant, item, t, interpreter)
        # a first launch with the first candidate tells the key and the arguments to prune on
        with tuned_table.forcing(kernel.name, candidates[0]) as launches:
            run()
        if not launches:
            continue  # this variant does not launch this kernel for this shape
        key, named, kwargs = launches[0]
        pruned = candidates
        prune = getattr(kernel.autotuner, "early_config_prune", None)
        if prune is not None:
            pruned = prune(candidates, named, **kwargs) or candidates
        timings: dict[str, float | str] = {}
        best = None
        for config in pruned:
            label = tuned_table.config_label(tuned_table.config_to_dict(config))
            try:
                with tuned_table.forcing(kernel.name, config):
                    error = relative_error(run(), ref)
                    if error > TOLERANCE[item.dtype]:
                        timings[label] = f"wrong result (relative error {error:.2e})"
                        continue
                    ms = time_call(run, device, reps)
            except Exception as exc:  # a config that does not compile or launch here
                timings[label] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                continue
            timings[label] = round(ms, 6)
            if best is None or ms < best[0]:
                best = (ms, config)
        if best is None:
            continue
        entries[key] = {
            "config": tuned_table.config_to_dict(best[1]),
            "ms": round(best[0], 6),
            "variant": variant,
            "layer": f"{item.shape.name}: {item.shape.label()}",
            "batch": item.batch, "experts": item.experts, "dtype": item.dtype,
            "layout": item.layout,
            "timings_ms": timings,
        }
    return entries


def tune_strategies(item: Item, t: dict, device: str, folder: str) -> dict[str, dict]:
    """{"forward": {key: entry}, "backward": {key: entry}}: every strategy of the ``triton``
    backend timed on the item (all four gradients asked for) with the configs tuned so far
    (the table in ``folder``), as benchmark mode times them; an entry names the fastest."""
    from dynconv.kernels import tuned_table

    from .strategy_timing import time_call_strategies

    saved = os.environ.get(tuned_table.ENV_DIR)
    os.environ[tuned_table.ENV_DIR] = folder
    tuned_table.clear_cache()
    try:
        s = item.shape
        found = time_call_strategies(t["x"], t["bank"], t["routing"], t["bias"], t["grad_out"],
                                     (s.stride,) * 2, (s.padding,) * 2, (s.dilation,) * 2,
                                     s.groups)
    finally:
        if saved is None:
            os.environ.pop(tuned_table.ENV_DIR, None)
        else:
            os.environ[tuned_table.ENV_DIR] = saved
        tuned_table.clear_cache()
    described = {"layer": f"{item.shape.name}: {item.shape.label()}", "batch": item.batch,
                 "experts": item.experts, "dtype": item.dtype, "layout": item.layout}
    return {kind: {key: {**entry, **described}} for kind, (key, entry) in found.items()
            if entry.get("strategy")}


def new_table(device_name: str, device_slug: str) -> dict:
    import torch
    import triton

    from dynconv.kernels import tuned_table

    table = {"format": tuned_table.FORMAT_VERSION, "device": device_name,
             "device_slug": device_slug, "triton": triton.__version__,
             "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "kernels": {}}
    if torch.cuda.is_available() and device_slug != tuned_table.INTERPRETER_DEVICE:
        table["capability"] = list(torch.cuda.get_device_capability())
    return table


def open_table(path: str, device_name: str, device_slug: str) -> dict:
    """The existing table at ``path`` if it is valid here (entries are merged), else a new one."""
    from dynconv.kernels import tuned_table

    if os.path.isfile(path):
        try:
            with open(path) as f:
                table = json.load(f)
            reason = tuned_table.check_table(table, device_name, path)
        except (OSError, ValueError) as exc:
            reason = str(exc)
        if reason is None:
            return table
        print(f"sweep: replacing {path}: {reason}", file=sys.stderr)
    return new_table(device_name, device_slug)


def write_table(table: dict, path: str) -> None:
    import torch

    table["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    table["torch"] = torch.__version__
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def items_for(args, interpreter: bool) -> list[Item]:
    shapes = list(get_shape_set(args.shape_set)) if args.shape_set else []
    shapes += args.shape
    if not shapes:
        shapes = list(get_shape_set("resnet18"))
    batches, layouts = args.batch, args.layout
    if interpreter:
        # miniatures: the interpreter pays per program and per op
        shapes = [tiny(s) for s in shapes]
        batches = sorted({min(b, 2) for b in batches})
    seen, items = set(), []
    for shape in shapes:
        for batch in batches:
            for dtype in args.dtype:
                for layout in layouts:
                    for experts in args.experts:
                        key = (geometry_key(shape), batch, experts, dtype, layout)
                        if key not in seen:
                            seen.add(key)
                            items.append(Item(shape, batch, experts, dtype, layout))
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.autotune sweep",
        description="Tune every Triton kernel over a shape set x batch x dtype x layout and "
                    "write the winners to <table-dir>/<device>.json (used before autotuning).")
    parser.add_argument("--set", dest="shape_set", choices=sorted(SHAPE_SETS),
                        help="tune the conv layers of this network (default resnet18 when no "
                             "--shape is given)")
    parser.add_argument("--shape", type=shape_arg, action="append", default=[],
                        help="a custom layer, e.g. cin=64,cout=128,hw=56,k=3,stride=2")
    parser.add_argument("--batch", type=int_list("--batch"), default=[32],
                        help="comma-separated batch sizes (default 32; at most 2 when "
                             "interpreting)")
    parser.add_argument("--experts", type=int_list("--experts"), default=[4],
                        help="comma-separated K values (default 4)")
    parser.add_argument("--dtype", type=csv_list(DTYPES, "dtype"), default=["bf16", "fp32"],
                        help=f"comma-separated subset of {','.join(DTYPES)} (default bf16,fp32)")
    parser.add_argument("--layout", type=csv_list(LAYOUTS, "layout"), default=["channels_last"],
                        help=f"comma-separated subset of {','.join(LAYOUTS)} (default "
                             "channels_last)")
    parser.add_argument("--kernels", type=csv_list(KERNELS, "kernel"), default=list(KERNELS),
                        help=f"subset of {','.join(KERNELS)}")
    parser.add_argument("--out", "--table-dir", dest="table_dir", default=None,
                        help="folder of the table (default: $DYNCONV_TUNED_DIR or the user's "
                             "~/.cache/dynconv/tuned, read before the package's tables)")
    parser.add_argument("--interpreter", action="store_true",
                        help="without a GPU: tune miniature shapes under Triton's interpreter "
                             "(a test of the tool: its timings mean nothing)")
    parser.add_argument("--no-strategies", dest="strategies", action="store_false",
                        help="tune the kernels' configs only, not the strategy choices")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="start no new kernel x shape after this many seconds (0: no "
                             "limit)")
    parser.add_argument("--reps", type=int, default=3,
                        help="CPU timer (interpreter): calls per candidate, median taken")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be tuned, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.interpreter:
        print("sweep: no CUDA GPU found (torch.cuda.is_available() is False): the sweep tunes "
              "the kernels on a GPU. To try the tool on miniature shapes under Triton's "
              "interpreter instead, pass --interpreter.", file=sys.stderr)
        return 2
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            parser.error("no CUDA GPU, and triton was imported before TRITON_INTERPRET=1 could "
                         "be set: run with TRITON_INTERPRET=1 in the environment")
        os.environ["TRITON_INTERPRET"] = "1"
    interpreter = not cuda
    if interpreter:
        print("sweep: --interpreter: tuning miniature shapes under Triton's interpreter (CPU "
              "timer): the table tests the tool, its timings mean nothing", file=sys.stderr)
    device = "cuda" if cuda else "cpu"

    from dynconv.kernels import tuned_table

    folder = args.table_dir or tuned_table.default_dir()
    device_slug, device_name = tuned_table.device_id(torch.device(device))
    path = tuned_table.table_path(device_slug, folder)
    items = items_for(args, interpreter)
    mode = "interpreter (CPU timer, miniature shapes)" if interpreter else device_name
    if args.dry_run:
        print(f"dry run: {len(items)} shapes x kernels {','.join(args.kernels)} on {mode}")
        for kernel_name in args.kernels:
            spec = KERNELS[kernel_name]
            try:
                count = len(_resolve(spec.configs)(interpreter=False))
            except (ImportError, AttributeError) as exc:
                count = f"unavailable ({exc})"
            print(f"  {kernel_name}: {count} candidate configs, variants "
                  f"{','.join(spec.variants)}")
        for item in items:
            print(f"  {item.shape.name:22s} {item.shape.label():26s} batch={item.batch:<4d} "
                  f"K={item.experts:<3d} {item.dtype:5s} {item.layout}")
        print(f"would write {path}")
        return 0

    kernels = {}
    for kernel_name in args.kernels:
        try:
            kernels[kernel_name], note = hooked_kernel(KERNELS[kernel_name])
            _resolve(KERNELS[kernel_name].configs)
        except (ImportError, AttributeError) as exc:
            print(f"sweep: skipping {kernel_name}: {exc}", file=sys.stderr)
            continue
        if note:
            print(f"sweep: {note}", file=sys.stderr)
    if not kernels:
        print("sweep: no kernel can be tuned here", file=sys.stderr)
        return 1
    table = open_table(path, device_name, device_slug)
    started = time.monotonic()
    bar = progress(len(items) * len(kernels), not args.no_progress, "sweep")
    tuned = 0
    over_budget = lambda: (args.time_budget  # noqa: E731
                           and time.monotonic() - started > args.time_budget)
    try:
        for item in items:
            if over_budget():
                break
            t = make_tensors(item, device)
            ref = reference(item, t)
            for kernel_name, kernel in kernels.items():
                if over_budget():
                    break
                bar.set_postfix_str(f"{kernel_name} {item.shape.label()} b{item.batch} "
                                    f"{item.dtype}")
                try:
                    entries = tune_one(kernel_name, kernel, item, device, interpreter, t, ref,
                                       args.reps)
                except Exception as exc:  # reported, the other kernels still get tuned
                    print(f"sweep: {kernel_name} on {item.shape.label()} failed: "
                          f"{type(exc).__name__}: {exc}", file=sys.stderr)
                    entries = {}
                table["kernels"].setdefault(kernel.name, {}).update(entries)
                tuned += len(entries)
                bar.update(1)
                write_table(table, path)  # after each kernel: a killed sweep keeps its work
            if args.strategies and not over_budget():
                chosen = tune_strategies(item, t, device, folder)
                for kind, entries in chosen.items():
                    table.setdefault("strategies", {}).setdefault(kind, {}).update(entries)
                    tuned += len(entries)
                write_table(table, path)
    finally:
        bar.close()
    if over_budget():
        print(f"sweep: time budget of {args.time_budget:.0f} s spent; stopped early",
              file=sys.stderr)
    tuned_table.clear_cache()
    print(f"sweep: {tuned} tuned entries written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
