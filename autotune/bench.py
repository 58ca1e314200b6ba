"""``python -m dynconv.autotune bench``: time and measure dynamic convolution providers.

For every case (a conv shape x batch x K x dtype x layout) and every mode, the static
``F.conv2d`` of the same shape and every provider are timed in the same *interleaved* rounds:
each round takes one sample of each, in an order that changes from round to round
(:func:`round_order`, a balanced Latin square: over as many rounds as there are providers, each
one runs in every position once, and after every other one; no provider always runs right after
the warm-ups or right after the same neighbour). A provider's ``time_ms`` is its
minimum over the rounds ("min of 5 interleaved rounds"), ``static_time_ms`` the static
conv's minimum in the same rounds and ``ratio_to_static`` the ratio of the two; the medians are
kept beside them (``time_median_ms``; ``ratio_median``, the median of the per-round ratios,
which holds better on a busy machine). A sample is :class:`dynconv.autotune.measure.Timer`'s.
Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, and on the CPU the peak RSS
(``VmHWM``) of a fresh process (:func:`dynconv.autotune.measure.fresh_process_peak_rss`), minus
its RSS just before the run. Every row records the run's ``THP_MEM_ALLOC_ENABLE``
(``thp_mem_alloc_enable``: its value or ``unset``) and glibc's malloc variables
(``malloc_env``), the CPU allocator setting (``--allocator`` starts the run with one).

On the CPU, every ``auto`` row says what ``auto`` ran (``auto_path``, :func:`auto_path`): the
grouped trick's own graph, or the native backend's formulations.

Modes: ``fwd`` is inference (``torch.no_grad``), ``fwd+bwd`` a training step's forward and
backward, ``bwd`` the backward alone on a retained graph.

Providers (all at the functional level: x, the bank, the bias bank and the routing weights are
leaves that need gradients; the router MLP is not part of the timing):

- ``static``: ``F.conv2d`` with one (Cout, Cin/g, kh, kw) weight: the floor.
- one provider per name ``backend=`` accepts (the registry's list), each
  ``dynamic_conv2d(..., backend=<name>)``: ``auto`` (the library's default path), ``loop`` (one
  ``F.conv2d`` per sample), ``grouped`` (the grouped-conv trick, plain autograd), ``native``
  and ``triton`` (only on CUDA: the CPU interpreter is not something to time). By default every
  provider but ``native`` runs (on the CPU ``auto`` is ``native``); name it in ``--providers``
  to time it.
- ``timm``: timm's own ``CondConv2d`` (the grouped-conv trick as timm writes it: the experts
  mixed by one matmul over (K, Cout * Cin/g * kh * kw), then one grouped conv), on the bank
  and routing weights of the other providers. 2-D only, and timed on the ``layers`` group only
  (the real network layers; elsewhere it would repeat ``grouped``). Without timm installed (it
  comes with the ``bench`` extra) its rows are ``skipped`` with a note.
- ODConv, on the cases of the ``odconv`` group only (which times nothing else but the static
  conv; presets ``odconv`` and ``odconv-tiny``, written to ``odconv.csv`` instead of
  ``bench_<preset>.csv``): ``odconv_published``, ODConv's published formulation
  (:func:`odconv_published`: the B x K x |W| aggregate materialised), and one provider per
  backend name, ``odconv_<backend>``: ``dynamic_conv2d(..., backend=<backend>, in_scale=,
  out_scale=, tap_scale=)`` (``odconv_auto`` by default; the others by name). The attentions
  (routing and the three scales, :func:`odconv_scales`) are inputs, the same tensors for every
  provider of a case; the router is not timed.

The output is one long-format CSV per run, ``<out>/<device>/bench_<preset>.csv``: one row per
(group, case, provider, mode), with the device, the versions, the git commit and the figures; a
provider that cannot run has ``status`` ``skipped`` (or ``error``/``oom``) and a ``note`` saying
why.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dynconv.backends.registry import BACKEND_NAMES, get_backend

from .measure import (
    Timer,
    csv_list,
    cuda_peak_memory,
    device_name,
    device_slug,
    fresh_process_peak_rss,
    int_list,
    shape_arg,
    versions,
)
from .measure import progress as progress_bar
from .shapes import SHAPE_SETS, ConvShape, find_layer, geometry_key, get_shape_set, tiny

# provider -> the ``backend=`` it passes: one provider per backend name of the registry
BACKEND_OF = {name: name for name in BACKEND_NAMES}
# ODConv (per-sample in / out / tap scales): the group of its cases, the published formulation
# (:func:`odconv_published`) and the library's, one provider per backend name
ODCONV_GROUP = "odconv"
ODCONV_PUBLISHED = "odconv_published"
ODCONV_BACKEND_OF = {f"odconv_{name}": name for name in BACKEND_NAMES}
ODCONV_PROVIDERS = (ODCONV_PUBLISHED, *ODCONV_BACKEND_OF)
PROVIDERS = ("static", *BACKEND_OF, "timm", *ODCONV_PROVIDERS)
# providers timed only on the cases of one group: provider -> that group
PROVIDER_GROUPS = {"timm": "layers", **dict.fromkeys(ODCONV_PROVIDERS, ODCONV_GROUP)}
# groups that time only their own providers (and the static conv): group -> those providers
GROUP_PROVIDERS = {ODCONV_GROUP: ODCONV_PROVIDERS}
# on the CPU "native" is what "auto" runs; elsewhere it is an extra, asked for by name; of the
# library's ODConv, "odconv_auto" runs by default (the others are asked for by name)
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p != "native" and not (
    p in ODCONV_BACKEND_OF and p != "odconv_auto"))
# bench CSVs written before the provider took the backend's name
RENAMED_PROVIDERS = {"dynconv": "auto"}
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("nchw", "channels_last")
PRESETS = ("quick", "gpu", "tiny", "odconv", "odconv-tiny")
# presets whose CSV is not ``bench_<preset>.csv`` (the report searches folders for those): the
# ODConv rows go to their own CSV, which the report reads beside the main one
PRESET_CSV = {"odconv": "odconv.csv", "odconv-tiny": "odconv.csv"}
# make report's figures are the minimum of at least this many interleaved rounds
QUICK_CPU_MIN_ROUNDS = 5
# CPU: the shortest sample, in ms of back-to-back calls. make report asks for REPORT_SAMPLE_MS:
# with one 12 ms call per sample, the minimum of 5 rounds of the same calls (auto running the
# trick's own graph, and the trick) came out up to 8 % apart on a 2-core VM, the page faults
# of a call varying with what the allocator kept; with 100 ms samples, within 0-4 %.
DEFAULT_SAMPLE_MS = 10.0
REPORT_SAMPLE_MS = 100.0
# the group of memory-only cases (Case.timing False)
MEMORY_GROUP = "memory"
# PyTorch's CPU allocator asks for transparent huge pages on large blocks when this is 1
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
# glibc's malloc settings a run records (read once, when the process starts)
MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "GLIBC_TUNABLES")
# The documented CPU allocator setting (README, "Performance"): glibc serves blocks of up to
# 32 MiB (its largest mmap threshold) from its heap and never gives the heap back, so a block
# freed by one call is reused by the next instead of coming back from the OS page by page.
# By default it raises its threshold as mapped blocks are freed and trims the heap's top past
# twice that, so whether a call's blocks cost page faults depends on which calls ran before it:
# on a 2-core VM the same calls measured 13 and 27 ms in one run. Each run's page faults are
# what the setting removes, for the static conv as for every provider.
STEADY_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                   "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}
# --allocator: the allocator variables a run starts with (None: the environment as it is)
ALLOCATOR_SETTINGS = {"inherit": None, "default": {}, "thp": {THP_VARIABLE: "1"},
                      "steady-heap": STEADY_HEAP_ENV}

# Dense tensor-core peaks (TFLOP/s) from the vendors' datasheets: (bf16/fp16, tf32, fp32).
DEVICE_PEAK_TFLOPS = {
    "h200": (989.4, 494.7, 66.9),
    "h100 sxm": (989.4, 494.7, 66.9),
    "h100 80gb hbm3": (989.4, 494.7, 66.9),
    "h100 pcie": (756.0, 378.0, 51.2),
    "h100": (756.0, 378.0, 51.2),
    "a100": (312.0, 156.0, 19.5),
    "l40s": (362.1, 183.0, 91.6),
    "l4": (121.0, 60.0, 30.3),
}


@dataclass(frozen=True)
class Case:
    """One benchmark point. ``group`` names the sweep it belongs to (the axis that varies)."""

    group: str
    shape: ConvShape
    batch: int
    experts: int = 4
    dtype: str = "fp32"
    layout: str = "nchw"
    memory: bool = True
    # False: peak memory only (no timing; rows of fwd+bwd only): a CPU memory probe of a case
    # too slow to time in a quick preset
    timing: bool = True

    def key(self) -> tuple:
        """Identity of the measurement (the group is only a label)."""
        return (geometry_key(self.shape), self.batch, self.experts, self.dtype, self.layout)


# ---------------------------------------------------------------------------------------------
# presets


def _square(name, channels, size, k=3, stride=1, cout=None) -> ConvShape:
    return ConvShape(name, channels, cout or channels, size, size, k, k, stride, k // 2)


# make report's layers: five ResNet-18 layers and a MobileNetV2 depthwise one, at batch 4
QUICK_LAYERS = (("resnet18", "layer1.0.conv1"), ("resnet18", "layer2.0.conv1"),
                ("resnet18", "layer2.0.downsample"), ("resnet18", "layer3.0.conv2"),
                ("resnet18", "layer4.0.conv2"), ("mobilenetv2", "features.3.depthwise"))
QUICK_LAYER_BATCH = 4


def quick_layers() -> list[ConvShape]:
    return [find_layer(net, name) for net, name in QUICK_LAYERS]


def preset_cases(preset: str, device: str) -> list[Case]:
    """The cases of a named preset.

    ``quick``: small enough for a 2-core CPU in a few minutes: a batch sweep of a 128-channel
    3x3 conv at 7x7 (with peak memory); one axis varies per other group around a 64-channel 3x3
    conv at 14x14, batch 16, K=4, fp32 NCHW; five ResNet-18 layers and a MobileNetV2 depthwise
    layer at batch 4; on the CPU, the peak memory (only) of those layers at batch 32 (group
    ``memory``). ``gpu``: ResNet-18 layers at batch 32 and 128 in bf16
    and fp32, channels_last, plus a batch sweep. ``tiny``: a toy shape, for tests.
    ``odconv``: ODConv's scales (group ``odconv``) on the quick preset's layers at its batch,
    with peak memory; ``odconv-tiny``: one toy case of it, for tests.
    """
    if preset == "odconv":
        return [Case(ODCONV_GROUP, s, QUICK_LAYER_BATCH) for s in quick_layers()]
    if preset == "odconv-tiny":
        return [Case(ODCONV_GROUP, _square("tiny", 4, 6), 2)]
    if preset == "tiny":
        shape = _square("tiny", 4, 6)
        cases = [Case("batch", shape, 1, memory=False), Case("batch", shape, 2)]
        cases.append(Case("dtype", shape, 2, dtype="bf16", layout="channels_last", memory=False))
        return cases
    if preset == "quick":
        base = _square("c64@14", 64, 14)
        # wide enough that the B x |W| mixed weights (0.6 MB a sample) show in peak memory
        cases = [Case("batch", _square("c128@7", 128, 7), b) for b in (1, 4, 16, 32)]
        layers = quick_layers()
        cases += [Case("layers", s, QUICK_LAYER_BATCH, memory=False) for s in layers]
        cases += [Case("experts", base, 16, experts=k, memory=False) for k in (1, 4, 16)]
        cases += [Case("width", _square(f"c{c}@14", c, 14), 16, memory=False)
                  for c in (16, 32, 64, 128)]
        cases += [Case("spatial", _square(f"c64@{s}", 64, s), 16, memory=False)
                  for s in (7, 14, 28)]
        cases += [Case("dtype", base, 16, dtype=d, layout=lay, memory=False)
                  for d in ("fp32", "bf16") for lay in LAYOUTS]
        # one 1-D (speech-like) and one 3-D (video-like) layer, CPU-sized
        cases += [Case("1d-3d", ConvShape("speech-1d", 128, 128, 1, 500, 1, 5, 1, 2,
                                          spatial_dims=1), 4, memory=False),
                  Case("1d-3d", ConvShape("video-3d", 32, 32, 28, 28, 3, 3, 1, 1,
                                          spatial_dims=3, d=4, kd=3), 2, memory=False)]
        # the memory goal: the layers' peak memory at batch 32 (not timed: a fresh
        # process per provider, no rounds)
        if device == "cpu":
            cases += [Case(MEMORY_GROUP, s, 32, timing=False) for s in layers]
        return cases
    if preset == "gpu":
        # most telling first: a cut-short run (gpu-check's time budget) keeps those
        base = find_layer("resnet18", "layer2.0.conv2")
        layers = get_shape_set("resnet18")
        cases = [Case("layers", s, 32, dtype="bf16", layout="channels_last") for s in layers]
        cases += [Case("batch", base, b, dtype="bf16", layout="channels_last")
                  for b in (8, 32, 128, 256)]
        cases += [Case("layers", s, 128, dtype="bf16", layout="channels_last") for s in layers]
        cases += [Case("layers", s, b, dtype="fp32", layout="channels_last")
                  for b in (32, 128) for s in layers]
        cases += [Case("experts", base, 128, experts=k, dtype="bf16", layout="channels_last")
                  for k in (2, 4, 8, 16)]
        cases += [Case("1d-3d", ConvShape("speech-1d", 256, 256, 1, 1000, 1, 5, 1, 2,
                                          spatial_dims=1), 32, dtype="bf16",
                       layout="channels_last"),
                  Case("1d-3d", ConvShape("video-3d", 64, 64, 56, 56, 3, 3, 1, 1,
                                          spatial_dims=3, d=8, kd=3), 8, dtype="bf16",
                       layout="channels_last")]
        return cases
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")


# ---------------------------------------------------------------------------------------------
# environment


def device_peak_tflops(device: str, dtype: str) -> float:
    """The device's dense peak for ``dtype`` (fp32 counts as tf32 when cuDNN may use it)."""
    if device != "cuda":
        return float("nan")
    name = device_name(device).lower()
    for model, peaks in DEVICE_PEAK_TFLOPS.items():
        if model in name:
            if dtype in ("bf16", "fp16"):
                return peaks[0]
            return peaks[1] if torch.backends.cudnn.allow_tf32 else peaks[2]
    return float("nan")


def triton_unavailable_reason(device: str, dtype: str = "fp32") -> str | None:
    """Why the ``triton`` provider cannot be timed here, or None if it can."""
    if device != "cuda":
        return "needs CUDA (Triton's CPU interpreter is for correctness, not timing)"
    try:
        get_backend("triton").check_can_run(torch.device(device), DTYPES[dtype])
    except ValueError as exc:
        return str(exc)
    return None


def timm_unavailable_reason(case: Case | None = None) -> str | None:
    """Why the ``timm`` provider cannot be timed (on ``case``), or None if it can."""
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed (it comes with the bench extra: pip install -e '.[bench]')"
    if case is not None and case.shape.spatial_dims != 2:
        return "timm's CondConv2d is 2-D only"
    return None


def provider_applies(provider: str, case: Case) -> bool:
    """Whether ``provider`` is timed on ``case`` at all (see PROVIDER_GROUPS and
    GROUP_PROVIDERS; the static conv, the reference, always is)."""
    if case.group in GROUP_PROVIDERS and provider != "static":
        return provider in GROUP_PROVIDERS[case.group]
    return PROVIDER_GROUPS.get(provider, case.group) == case.group


def provider_backend(provider: str) -> str | None:
    """The ``backend=`` a provider passes to dynconv (None: it does not call dynconv)."""
    return BACKEND_OF.get(provider) or ODCONV_BACKEND_OF.get(provider)


# ---------------------------------------------------------------------------------------------
# the operations being timed


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its channels innermost: channels_last (2-D), channels_last_3d (3-D), or a
    (B, C, L) view of a (B, L, C) tensor (1-D)."""
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous(memory_format=torch.channels_last)


_STATIC = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dynamic_conv_of(shape: ConvShape):
    """``dynconv.dynamic_conv{1,2,3}d`` for the shape's number of spatial axes."""
    import dynconv

    return {1: dynconv.dynamic_conv1d, 2: dynconv.dynamic_conv2d,
            3: dynconv.dynamic_conv3d}[shape.spatial_dims]


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Leaf tensors of a case: x, the static weight/bias, the bank, bias bank and routing."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    s = case.shape

    def leaf(*size, scale=1.0):
        t = torch.randn(*size, generator=generator) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    fan_in = (s.cin // s.groups) * s.kh * s.kw * s.kd
    x = torch.randn(case.batch, s.cin, *s.spatial, generator=generator)
    x = x.to(device=device, dtype=dtype)
    if case.layout == "channels_last":
        x = channels_last(x)
    x.requires_grad_(True)
    routing = torch.softmax(torch.randn(case.batch, case.experts, generator=generator), dim=1)
    return {
        "x": x,
        "weight": leaf(s.cout, s.cin // s.groups, *s.kernel, scale=fan_in ** -0.5),
        "bias": leaf(s.cout, scale=0.1),
        "bank": leaf(case.experts, s.cout, s.cin // s.groups, *s.kernel, scale=fan_in ** -0.5),
        "bias_bank": leaf(case.experts, s.cout, scale=0.1),
        "routing": routing.to(device=device, dtype=dtype).requires_grad_(True),
    }


def forward_fn(provider: str, case: Case, t: dict) -> tuple[Callable[[], torch.Tensor], list]:
    """(a zero-argument forward, the leaves its backward differentiates) for ``provider``."""
    s = case.shape
    if provider == "static":
        static = _STATIC[s.spatial_dims]
        return (lambda: static(t["x"], t["weight"], t["bias"], s.stride, s.padding, s.dilation,
                               s.groups),
                [t["x"], t["weight"], t["bias"]])
    if provider == "timm":
        return timm_forward(case, t)
    if provider in ODCONV_PROVIDERS:
        return odconv_forward(provider, case, t)
    dynamic = dynamic_conv_of(s)
    backend = BACKEND_OF[provider]
    return (lambda: dynamic(t["x"], t["bank"], t["routing"], t["bias_bank"], s.stride,
                            s.padding, s.dilation, s.groups, backend=backend),
            [t["x"], t["bank"], t["routing"], t["bias_bank"]])


def timm_forward(case: Case, t: dict) -> tuple[Callable[[], torch.Tensor], list]:
    """timm's ``CondConv2d`` holding the case's bank (K, Cout, Cin/g, kh, kw) in its layout
    (K, Cout * Cin/g * kh * kw) and its bias bank (K, Cout), called on x and the routing weights
    (B, K): (forward, its leaves: x, its weight, the routing weights, its bias)."""
    from timm.layers import CondConv2d

    s = case.shape
    bank = t["bank"]
    conv = CondConv2d(s.cin, s.cout, s.kernel, s.stride, s.padding, s.dilation, s.groups,
                      bias=True, num_experts=case.experts, device=bank.device, dtype=bank.dtype)
    with torch.no_grad():
        conv.weight.copy_(bank.flatten(1))
        conv.bias.copy_(t["bias_bank"])
    return (lambda: conv(t["x"], t["routing"]), [t["x"], conv.weight, t["routing"], conv.bias])


def odconv_scales(case: Case, t: dict) -> dict:
    """ODConv's attentions of a case, added to its inputs ``t`` once (so that every provider
    of the case gets the same tensors): in_scale (B, Cin), out_scale (B, Cout) and tap_scale
    (B, kh, kw), sigmoid outputs (positive, as ODConv's channel, filter and spatial attentions
    are) from their own seeded generator, leaves that need gradients. The kernel attention is
    the case's routing (a softmax over K, as ODConv's)."""
    if "tap_scale" not in t:
        s = case.shape
        if s.spatial_dims != 2:
            raise ValueError("ODConv's scales are 2-D only (dynamic_conv2d)")
        generator = torch.Generator().manual_seed(1)
        x = t["x"]
        for name, size in (("in_scale", (case.batch, s.cin)), ("out_scale", (case.batch, s.cout)),
                           ("tap_scale", (case.batch, s.kh, s.kw))):
            value = torch.sigmoid(torch.randn(*size, generator=generator))
            t[name] = value.to(device=x.device, dtype=x.dtype).requires_grad_(True)
    return t


def odconv_published(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                     in_scale, out_scale, tap_scale):
    """ODConv as its paper's code writes it (the baseline of the ``odconv`` group): x scaled by
    the input-channel attention; the B x K x |W| tensor of every sample's tap-scaled, routed
    experts materialised and summed over K (autograd keeps it for the backward); one grouped
    conv of the batch folded into the channels; y scaled by the output-channel attention; the
    routed bias added (not scaled, as :func:`dynconv.dynamic_conv2d` has it)."""
    batch, _, height, width = x.shape
    _, out_channels, in_per_group, kh, kw = weight_bank.shape
    x = x * in_scale[:, :, None, None]
    aggregate = (tap_scale[:, None, None, None, :, :] * routing[:, :, None, None, None, None]
                 * weight_bank.unsqueeze(0)).sum(1)  # (B, Cout, Cin/g, kh, kw)
    y = F.conv2d(x.reshape(1, -1, height, width),
                 aggregate.reshape(batch * out_channels, in_per_group, kh, kw), None, stride,
                 padding, dilation, groups * batch)
    y = y.view(batch, out_channels, y.shape[-2], y.shape[-1]) * out_scale[:, :, None, None]
    if bias_bank is not None:
        y = y + (routing @ bias_bank)[:, :, None, None]
    return y


def odconv_forward(provider: str, case: Case, t: dict) -> tuple[Callable[[], torch.Tensor], list]:
    """An ODConv provider on the case's inputs and :func:`odconv_scales`: the published
    formulation, or ``dynamic_conv2d`` with the three scales on the provider's backend."""
    import dynconv

    s = case.shape
    t = odconv_scales(case, t)
    names = ("x", "bank", "routing", "bias_bank", "in_scale", "out_scale", "tap_scale")
    leaves = [t[n] for n in names]
    x, bank, routing, bias_bank, in_scale, out_scale, tap_scale = leaves
    if provider == ODCONV_PUBLISHED:
        return (lambda: odconv_published(x, bank, routing, bias_bank, s.stride, s.padding,
                                         s.dilation, s.groups, in_scale, out_scale, tap_scale),
                leaves)
    backend = ODCONV_BACKEND_OF[provider]
    return (lambda: dynconv.dynamic_conv2d(x, bank, routing, bias_bank, s.stride, s.padding,
                                           s.dilation, s.groups, backend=backend,
                                           in_scale=in_scale, out_scale=out_scale,
                                           tap_scale=tap_scale),
            leaves)


def mode_fn(mode: str, forward: Callable, leaves: list) -> Callable[[], object]:
    """The callable timed for ``mode``.

    ``fwd`` is inference (under ``torch.no_grad``); ``fwd+bwd`` a training step's forward and
    backward; ``bwd`` the backward alone, replayed on one forward graph (``retain_graph``).
    """
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return forward()
        return fwd
    if mode == "fwd+bwd":
        def fwd_bwd():
            y = forward()
            return torch.autograd.grad(y, leaves, torch.ones_like(y))
        return fwd_bwd
    y = forward()
    grad = torch.ones_like(y)
    return lambda: torch.autograd.grad(y, leaves, grad, retain_graph=True)


def auto_path(forward: Callable, mode: str) -> str:
    """What ``auto``'s ``forward`` runs on the CPU in ``mode``, in words, from the native
    backend's plans of one call: ``the grouped trick's graph`` (autograd's own graph of the
    trick: the same calls as the ``grouped`` provider), or ``native: <forward> / <input grad> /
    <weight grad>`` formulations (forward only in ``fwd``), with the chunk size where the batch
    is cut; "" where no native plan was made (another backend)."""
    from dynconv.backends.native import op

    plans, original = [], op._plan

    def recording(x, *args, **kwargs):
        plan = original(x, *args, **kwargs)
        plans.append((plan, x.shape[0]))
        return plan

    op._plan = recording
    try:
        with torch.set_grad_enabled(mode != "fwd"):
            forward()
    finally:
        op._plan = original
    words = []
    for plan, batch in dict.fromkeys(plans):
        f = plan.formulations
        if mode != "fwd" and plan.graph:
            words.append("the grouped trick's graph")
            continue
        words.append((f"native: {f.forward}" if mode == "fwd" else
                      f"native: {f.forward} / {f.input_grad} / {f.weight_grad}")
                     + (f", chunks of {plan.chunk}" if plan.chunk < batch else ""))
    return "; ".join(dict.fromkeys(words))


def mode_flops(case: Case, mode: str) -> int:
    """Useful FLOPs of the static conv (backward = data grad + weight grad = 2x forward)."""
    return case.shape.flops(case.batch) * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


# ---------------------------------------------------------------------------------------------
# peak memory on the CPU


def mini_case(case: Case) -> Case:
    """A miniature of ``case`` for warm-up runs: same kernel, stride, kind of groups, batch,
    K, dtype and layout (code paths that PyTorch picks by batch size are warmed too), 4
    channels at 5x5."""
    return replace(case, shape=tiny(case.shape, 4, 5), memory=False)


def fwd_bwd_run(case: Case, provider: str, miniature: bool = False,
                forward: Callable | None = None) -> Callable[[], object]:
    """The forward+backward of ``provider`` on fresh CPU inputs of ``case`` (or its miniature):
    the ``setup`` of :func:`dynconv.autotune.measure.fresh_process_peak_rss`. ``forward``: how
    a provider's forward is built (default :func:`forward_fn`)."""
    forward = forward or forward_fn
    if miniature:
        case = mini_case(case)
    fn, leaves = forward(provider, case, make_inputs(case, "cpu"))
    return mode_fn("fwd+bwd", fn, leaves)


# ---------------------------------------------------------------------------------------------
# a run


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of ``names`` in round ``round_index``: a balanced Latin square (Williams'
    design): over ``len(names)`` rounds every name takes every position once and, for an even
    count, follows every other name exactly once (an odd count needs twice as many rounds: the
    rows are then followed by their mirror images). So no provider always runs first after the
    warm-ups, or always right after the same neighbour (the static conv, say)."""
    n = len(names)
    if n == 0:
        return []
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    row = round_index % (n if n % 2 == 0 else 2 * n)
    order = [names[(i + row) % n] for i in first]
    return order[::-1] if row >= n else order


def interleaved_rounds(timer: Timer, fns: dict[str, Callable], rounds: int,
                       ) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Time every callable of ``fns`` (name -> zero-argument callable) in the same rounds.

    Each callable is warmed up once (which also sizes its sample:
    :meth:`~dynconv.autotune.measure.Timer.calls_for`); then ``rounds`` times, one sample of
    each, in the round's order of :func:`round_order` over the names of ``fns``. A callable
    that raises is dropped from the later rounds. Returns (name -> its samples in ms, round
    by round; name -> the exception that stopped it)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, BaseException] = {}
    calls: dict[str, int] = {}
    timed = {name: fn if isinstance(fn, RemoteCall) else LocalCall(timer, fn)
             for name, fn in fns.items()}
    for name, fn in timed.items():
        try:
            calls[name] = fn.calls_for()
        except Exception as exc:
            errors[name] = exc
    for index in range(rounds):
        for name in round_order(list(fns), index):
            if name in errors:
                continue
            try:
                samples[name].append(timed[name].sample(calls[name]))
            except Exception as exc:
                errors[name] = exc
    return samples, errors


@dataclass
class LocalCall:
    """A callable timed in this process by ``timer`` (the other kind: :class:`RemoteCall`)."""

    timer: Timer
    fn: Callable

    def calls_for(self) -> int:
        return self.timer.calls_for(self.fn)

    def sample(self, calls: int) -> float:
        return self.timer.sample(self.fn, calls)


# ---------------------------------------------------------------------------------------------
# one process per provider (bench --isolate)


def _provider_process_main(conn, timer: Timer, threads: int) -> None:
    """A provider process's loop: ``("prepare", case, provider, mode)`` builds the case's
    inputs and the callable of ``mode`` (dropping the previous one first), ``("calls_for",)``
    and ``("sample", calls)`` time it with ``timer`` (the parent's); ``("stop",)`` ends.
    Every reply is ``("ok", value)`` or ``("error", words)``."""
    torch.set_num_threads(threads)
    fn = None
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        try:
            reply = None
            if message[0] == "prepare":
                _, case, provider, mode = message
                fn = None  # the previous case's tensors go before the next case's come
                fn = mode_fn(mode, *forward_fn(provider, case, make_inputs(case, "cpu")))
            elif message[0] == "calls_for":
                reply = timer.calls_for(fn)
            else:
                reply = timer.sample(fn, message[1])
            conn.send(("ok", reply))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    conn.close()


class ProviderProcess:
    """A spawned process that times one provider, case after case (``bench --isolate``, CPU).

    Interleaved in one process, each provider's calls find the allocator as all of them left
    it: glibc's mmap threshold and heap trimming follow the largest blocks any of them freed,
    and the same calls then measure apart (perf_reports/cpu_reruns/README.md). In a process of
    its own a provider keeps its own allocator state, as a training loop that runs only it
    does; the parent still takes the samples round by round, one process running at a time.
    """

    def __init__(self, timer: Timer):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_provider_process_main,
                                        args=(child, timer, torch.get_num_threads()),
                                        daemon=True)
        self._process.start()
        child.close()

    def ask(self, *message):
        """Send ``message``; the reply's value, or a RuntimeError with the process's words."""
        self._conn.send(message)
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def prepare(self, case: Case, provider: str, mode: str) -> RemoteCall:
        self.ask("prepare", case, provider, mode)
        return RemoteCall(self)

    def close(self) -> None:
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


@dataclass
class RemoteCall:
    """The callable a ProviderProcess prepared, timed there (:func:`interleaved_rounds`)."""

    process: ProviderProcess

    def calls_for(self) -> int:
        return self.process.ask("calls_for")

    def sample(self, calls: int) -> float:
        return self.process.ask("sample", calls)


class ProviderProcesses:
    """One ProviderProcess per provider name, started when first asked for."""

    def __init__(self, timer: Timer):
        self._timer = timer
        self._processes: dict[str, ProviderProcess] = {}

    def __getitem__(self, provider: str) -> ProviderProcess:
        if provider not in self._processes:
            self._processes[provider] = ProviderProcess(self._timer)
        return self._processes[provider]

    def close(self) -> None:
        for process in self._processes.values():
            process.close()
        self._processes.clear()


def summarize_samples(times: list[float], static_times: list[float]) -> dict:
    """The figures of one provider's samples against the static conv's of the same rounds:
    ``time_ms`` its minimum over the rounds, ``static_time_ms`` the static conv's minimum,
    ``ratio_to_static`` the ratio of the two (min of the interleaved rounds), and the
    medians kept beside them (``time_median_ms``; ``ratio_median``: the median of the
    per-round ratios, robust on a busy machine)."""
    nan = float("nan")
    time_ms = min(times) if times else nan
    static_ms = min(static_times) if static_times else nan
    per_round = [t / s for t, s in zip(times, static_times) if s > 0]
    return {"time_ms": time_ms, "static_time_ms": static_ms,
            "ratio_to_static": time_ms / static_ms if static_ms > 0 else nan,
            "time_median_ms": _median(times), "ratio_median": _median(per_round)}


def measure_case(case: Case, providers: Iterable[str], device: str, rounds: int, timer: Timer,
                 memory: bool, forward: Callable | None = None,
                 modes: Iterable[str] = MODES,
                 processes: ProviderProcesses | None = None) -> list[dict]:
    """Rows (one per provider x mode, provider by provider) of one case; failures become rows
    with a status.

    Per mode, the static conv and every provider are timed in the same ``rounds`` rounds, one
    sample each per round in a balanced order (:func:`interleaved_rounds`): a provider's figure
    is its minimum over the rounds, its ratio that over the static conv's minimum in the same
    rounds (:func:`summarize_samples`). The static conv is always timed (the reference); it
    has rows only when ``providers`` names it.

    ``forward``: how a provider's forward is built (default :func:`forward_fn`; a module-level
    function of the same signature, so that the CPU memory probe can pickle it), for providers
    beyond the registry's (gpu-check's forced Triton strategies and the batch-spanning form).

    ``processes`` (CPU, the default ``forward`` only): time each provider, the static conv
    included, in its own process (:class:`ProviderProcess`) instead of this one.
    """
    if processes is not None and (device != "cpu" or forward is not None):
        raise ValueError("processes: one process per provider is for the CPU and the default "
                         "forward only")
    nan = float("nan")
    modes = [m for m in MODES if m in set(modes)]
    forward_of = forward or forward_fn
    memory_setup = fwd_bwd_run if forward is None else functools.partial(fwd_bwd_run,
                                                                         forward=forward)
    tensors = make_inputs(case, device)
    triton_reason = triton_unavailable_reason(device, case.dtype)
    timm_reason = timm_unavailable_reason(case)
    names = [p for p in dict.fromkeys(providers) if provider_applies(p, case)]
    rows: dict[tuple[str, str], dict] = {}
    for provider in names:
        for mode in modes:
            rows[provider, mode] = {
                "provider": provider, "mode": mode, "status": "ok", "note": "",
                "time_ms": nan, "static_time_ms": nan, "ratio_to_static": nan,
                "time_median_ms": nan, "ratio_median": nan, "peak_mem_bytes": nan,
                "mem_extra_bytes": nan, "mem_method": "", "auto_path": ""}

    def fail(provider: str, mode: str, exc: BaseException) -> None:
        row = rows[provider, mode]
        if device == "cuda" and _is_oom(exc):
            row.update(status="oom", note=str(exc).splitlines()[0][:200])
            torch.cuda.empty_cache()
        else:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])

    # the forwards of the providers that can run here ("static": the reference, always)
    forwards: dict[str, tuple] = {}
    for provider in ["static", *names]:
        reason = (triton_reason if provider_backend(provider) == "triton" else
                  timm_reason if provider == "timm" else None)
        if reason:
            for mode in modes:
                rows[provider, mode].update(status="skipped", note=reason)
            continue
        if provider in forwards:
            continue
        if provider == "static":  # the reference: a case without it is not measurable
            forwards[provider] = forward_of(provider, case, tensors)
            continue
        try:
            forwards[provider] = forward_of(provider, case, tensors)
        except Exception as exc:
            for mode in modes:
                fail(provider, mode, exc)
    if not case.timing:  # a memory probe: its forward+backward rows only, untimed
        modes = [m for m in modes if m == "fwd+bwd"]
        rows = {k: r for k, r in rows.items() if k[1] in modes}
        for row in rows.values():
            if row["status"] == "ok":
                row["note"] = "memory only (not timed)"
    for mode in modes if case.timing else ():
        fns: dict[str, Callable] = {}
        for provider, (fwd, leaves) in forwards.items():
            if provider != "static" and rows[provider, mode]["status"] != "ok":
                continue
            try:
                fns[provider] = (processes[provider].prepare(case, provider, mode)
                                 if processes is not None
                                 else mode_fn(mode, fwd, leaves))  # bwd: runs the forward
            except Exception as exc:
                if provider == "static":
                    for name in names:
                        fail(name, mode, exc)
                    break
                fail(provider, mode, exc)
        if "static" not in fns:
            continue
        samples, errors = interleaved_rounds(timer, fns, rounds)
        if "static" in errors:
            # no reference: nothing of this mode has a ratio
            for provider in names:
                if rows[provider, mode]["status"] == "ok":
                    fail(provider, mode, errors["static"])
            continue
        for provider in fns:
            if provider not in names:
                continue
            if provider in errors:
                fail(provider, mode, errors[provider])
                continue
            rows[provider, mode].update(summarize_samples(samples[provider], samples["static"]))
            if provider == "auto" and device == "cpu" and mode != "bwd":
                rows[provider, mode]["auto_path"] = auto_path(forwards[provider][0], mode)
        if memory and device == "cuda":
            for provider in fns:
                if provider not in names or rows[provider, mode]["status"] != "ok":
                    continue
                try:
                    peak, extra = cuda_peak_memory(fns[provider])
                    rows[provider, mode].update(peak_mem_bytes=peak, mem_extra_bytes=extra,
                                                mem_method="cuda_max_memory_allocated")
                except Exception as exc:
                    fail(provider, mode, exc)
        del fns
    if memory and device == "cpu" and "fwd+bwd" in modes:
        for provider in names:
            if (provider_backend(provider) == "triton"
                    or rows[provider, "fwd+bwd"]["status"] == "skipped"):
                continue
            result = fresh_process_peak_rss(memory_setup, (case, provider),
                                            torch.get_num_threads())
            row = rows[provider, "fwd+bwd"]
            if result.status == "ok":
                row.update(peak_mem_bytes=result.peak_bytes,
                           mem_extra_bytes=nan if result.extra_bytes is None
                           else result.extra_bytes, mem_method="fresh_process_vmhwm")
            if result.note:
                row["note"] = (row["note"] + "; " if row["note"] else "") + \
                    f"memory: {result.note}"
    return list(rows.values())


def case_columns(case: Case) -> dict:
    s = case.shape
    return {"group": case.group, "layer": s.name, "shape": s.label(), "cin": s.cin,
            "cout": s.cout, "spatial_dims": s.spatial_dims, "d": s.d, "h": s.h, "w": s.w,
            "kd": s.kd, "kh": s.kh, "kw": s.kw, "stride": s.stride,
            "padding": s.padding, "dilation": s.dilation, "groups": s.groups, "batch": case.batch,
            "experts": case.experts, "dtype": case.dtype, "layout": case.layout}


def derived_columns(row: dict, case: Case, device: str) -> dict:
    time_ms = row["time_ms"]
    flops = mode_flops(case, row["mode"])
    tflops = flops / (time_ms * 1e-3) / 1e12 if time_ms == time_ms and time_ms > 0 else float("nan")
    peak = device_peak_tflops(device, case.dtype)
    return {
        "samples_per_s": case.batch / (time_ms * 1e-3) if time_ms > 0 else float("nan"),
        "gflop": flops / 1e9,
        "tflops": tflops,
        "device_peak_tflops": peak,
        "peak_fraction": tflops / peak if peak == peak else float("nan"),
    }


COLUMNS = [
    "run_id", "timestamp", "preset", "device", "device_name", "device_slug", "torch", "triton",
    "python", "commit", "threads", "cpus", "thp_mem_alloc_enable", "malloc_env", "load_avg_1min",
    "rounds", "sample_ms", "timing_processes",
    "group", "layer", "shape",
    "cin", "cout", "spatial_dims", "d", "h", "w", "kd", "kh", "kw", "stride", "padding",
    "dilation", "groups", "batch",
    "experts", "dtype", "layout", "provider", "mode", "status", "note", "time_ms",
    "static_time_ms", "ratio_to_static", "time_median_ms", "ratio_median", "samples_per_s",
    "gflop", "tflops", "device_peak_tflops", "peak_fraction", "peak_mem_bytes", "mem_extra_bytes",
    "mem_method", "auto_path",
]


def thp_setting() -> str:
    """This process's ``THP_MEM_ALLOC_ENABLE`` (PyTorch's CPU allocator asks for transparent
    huge pages on large blocks when it is 1; read once, at start-up): its value, or ``unset``.
    Every row records it, so that a report can say which allocator setting a run had."""
    return os.environ.get(THP_VARIABLE, "unset")


def env_words(variables: dict[str, str]) -> str:
    """Environment variables as a shell would set them: ``NAME=value`` separated by spaces."""
    return " ".join(f"{name}={value}" for name, value in variables.items())


# how a run's malloc_env column reads with the documented setting
STEADY_HEAP_WORDS = env_words(STEADY_HEAP_ENV)


def malloc_setting() -> str:
    """This process's glibc malloc variables (MALLOC_VARIABLES) as ``NAME=value`` separated by
    spaces, or ``unset``; every row records it beside ``thp_mem_alloc_enable``."""
    return env_words({name: os.environ[name] for name in MALLOC_VARIABLES
                      if name in os.environ}) or "unset"


def allocator_environment(setting: str, environ: dict[str, str]) -> dict[str, str] | None:
    """The environment a run with ``--allocator setting`` starts with: ``environ`` without the
    allocator variables (THP_VARIABLE and MALLOC_VARIABLES), plus the setting's; None for
    ``inherit`` (``environ`` as it is)."""
    variables = ALLOCATOR_SETTINGS[setting]
    if variables is None:
        return None
    env = {k: v for k, v in environ.items()
           if k != THP_VARIABLE and k not in MALLOC_VARIABLES}
    return {**env, **variables}


def run(cases: list[Case], providers: list[str], device: str, rounds: int, out_csv: str,
        preset: str, memory: bool = True, progress: bool = True, time_budget_s: float = 0.0,
        rep_ms: float = 25.0, modes: Iterable[str] = MODES,
        sample_ms: float = DEFAULT_SAMPLE_MS, isolate: bool = False) -> str:
    """Measure every case; rewrite ``out_csv`` after each case (a cut-short run keeps data).
    ``isolate``: time each provider in a process of its own (:class:`ProviderProcess`)."""
    import pandas as pd

    os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
    meta = {"run_id": time.strftime("%Y%m%dT%H%M%S"), "timestamp": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "preset": preset, "device": device,
        "device_name": device_name(device), "device_slug": device_slug(device), **versions(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "thp_mem_alloc_enable": thp_setting(), "malloc_env": malloc_setting(), "rounds": rounds,
        "sample_ms": sample_ms if device == "cpu" else float("nan"),
        "timing_processes": "one per provider" if isolate else "one"}
    timer = Timer(device, rep_ms=rep_ms, min_sample_ms=sample_ms,
                  max_calls=max(20, math.ceil(sample_ms / 0.5)))
    processes = ProviderProcesses(timer) if isolate else None
    measured: dict[tuple, list[dict]] = {}
    records: list[dict] = []
    started = time.monotonic()
    bar = progress_bar(len(cases), progress, "bench")
    try:
        for case in cases:
            if time_budget_s and time.monotonic() - started > time_budget_s:
                print(f"bench: time budget of {time_budget_s:.0f} s spent; stopping before "
                      f"{case.group} {case.shape.label()} b{case.batch}", file=sys.stderr)
                break
            bar.set_postfix_str(f"{case.group} {case.shape.label()} b{case.batch} {case.dtype}")
            # how busy the machine was (other processes skew CPU timings; ratios less so)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            # the providers a case gets depend on its group (PROVIDER_GROUPS)
            key = (case.key(), case.timing,
                   tuple(p for p in providers if provider_applies(p, case)))
            if not case.timing and not (memory and case.memory and device == "cpu"):
                bar.update(1)  # a memory probe, and no memory asked for (or not a CPU)
                continue
            if key not in measured:
                measured[key] = measure_case(case, providers, device, rounds, timer,
                                             memory and case.memory, modes=modes,
                                             processes=processes)
            for row in measured[key]:
                records.append({**meta, "load_avg_1min": load, **case_columns(case), **row,
                                **derived_columns(row, case, device)})
            pd.DataFrame.from_records(records, columns=COLUMNS).to_csv(out_csv, index=False)
            bar.update(1)
    finally:
        bar.close()
        if processes is not None:
            processes.close()
    return out_csv


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.autotune bench",
        description="Time forward / backward / forward+backward and peak memory of dynamic conv "
                    "providers against the static conv of the same shape; write a long CSV to "
                    "<out>/<device>/bench_<preset>.csv.")
    parser.add_argument("--preset", choices=PRESETS,
                        help="named set of cases (default: quick on CPU, gpu on CUDA); ignored "
                             "when --set or --shape is given")
    parser.add_argument("--set", dest="shape_set", choices=sorted(SHAPE_SETS),
                        help="bench every layer of this network instead of a preset")
    parser.add_argument("--shape", type=shape_arg, action="append", default=[],
                        help="a custom layer, e.g. cin=64,cout=128,hw=56,k=3,stride=2 "
                             "(repeatable)")
    parser.add_argument("--batch", type=int_list("--batch"), default=[8],
                        help="batch sizes for --set/--shape (default 8)")
    parser.add_argument("--experts", type=int_list("--experts"), default=[4],
                        help="K values for --set/--shape (default 4)")
    parser.add_argument("--dtype", type=csv_list(DTYPES, "dtype"), default=["fp32"],
                        help="dtypes for --set/--shape (default fp32)")
    parser.add_argument("--layout", type=csv_list(LAYOUTS, "layout"), default=["nchw"],
                        help="memory layouts for --set/--shape (default nchw)")
    parser.add_argument("--providers", type=csv_list(PROVIDERS, "provider"),
                        default=list(DEFAULT_PROVIDERS),
                        help=f"subset of {','.join(PROVIDERS)} (default: all but native)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--groups", type=str, default=None,
                        help="comma-separated: only the preset's cases of these groups (e.g. "
                             "layers)")
    parser.add_argument("--modes", type=csv_list(MODES, "mode"), default=list(MODES),
                        help=f"subset of {','.join(MODES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per measurement, every provider once per "
                             "round in a balanced order; a figure is its minimum over them "
                             f"(default 5 CPU, 3 GPU; --preset quick on the CPU: at least "
                             f"{QUICK_CPU_MIN_ROUNDS})")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (default 1: on a shared or busy machine several "
                             "OpenMP threads make timings erratic; 0 keeps torch's default)")
    parser.add_argument("--rep-ms", type=float, default=25.0,
                        help="GPU: do_bench's rep (ms) per timed sample")
    parser.add_argument("--isolate", action="store_true",
                        help="CPU: time each provider (the static conv too) in a process of its "
                             "own, kept for the whole run, instead of all in this one: each "
                             "keeps its own allocator state, as a loop that runs only it does "
                             "(rounds are still interleaved, one process at a time)")
    parser.add_argument("--sample-ms", type=float, default=DEFAULT_SAMPLE_MS,
                        help="CPU: a sample repeats a call back to back until it lasts this "
                             f"long (default {DEFAULT_SAMPLE_MS:g}; make report: "
                             f"{REPORT_SAMPLE_MS:g}, where min-of-5 figures of the same calls "
                             "agree within a few per cent)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="stop starting new cases after this many seconds (0: no limit)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--allocator", choices=list(ALLOCATOR_SETTINGS), default="inherit",
                        help="CPU allocator variables to run with (the process starts again "
                             "with them: they are read at start-up): inherit (the environment "
                             "as it is), default (none set: as the machine comes), thp "
                             f"({THP_VARIABLE}=1), steady-heap (glibc keeps its heap: "
                             f"{STEADY_HEAP_WORDS}; the documented setting). Every row records "
                             "thp_mem_alloc_enable and malloc_env")
    parser.add_argument("--out", default="perf_reports", help="output root folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cases and providers that would run, then exit")
    return parser


def resolve_cases(args, device: str) -> tuple[str, list[Case]]:
    """(preset label, cases) from parsed arguments."""
    if args.shape_set or args.shape:
        shapes = list(get_shape_set(args.shape_set)) if args.shape_set else []
        shapes += args.shape
        label = args.shape_set or "custom"
        cases = [Case("layers", s, b, k, d, lay) for d in args.dtype for lay in args.layout
                 for k in args.experts for b in args.batch for s in shapes]
        return label, cases
    preset = args.preset or ("gpu" if device == "cuda" else "quick")
    cases = preset_cases(preset, device)
    if args.groups:
        wanted = [g for g in args.groups.split(",") if g]
        known = list(dict.fromkeys(c.group for c in cases))
        unknown = [g for g in wanted if g not in known]
        if unknown:
            raise ValueError(f"--groups: {', '.join(map(repr, unknown))} not in preset "
                             f"{preset!r} (its groups: {', '.join(known)})")
        cases = [c for c in cases if c.group in wanted]
    return preset, cases


def allocator_words(setting: str) -> str:
    """What ``--allocator setting`` runs with, in words (for a dry run)."""
    variables = ALLOCATOR_SETTINGS[setting]
    if variables is None:
        return f"as inherited ({THP_VARIABLE} {thp_setting()}; malloc {malloc_setting()})"
    return env_words(variables) or "as the machine comes (no allocator variable set)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    wanted = allocator_environment(args.allocator, dict(os.environ))
    if wanted is not None and wanted != dict(os.environ) and not args.dry_run:
        # the allocators read their variables once, at start-up: run again with them
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "dynconv.autotune", "bench", *argv],
                  wanted)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False")
    rounds = args.rounds or (3 if device == "cuda" else 5)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, got {rounds}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.isolate and device != "cpu":
        parser.error(f"--isolate is for the CPU (a GPU's timings do not share an allocator's "
                     f"heap), got --device {device}")
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    try:
        label, cases = resolve_cases(args, device)
    except ValueError as exc:
        parser.error(str(exc))
    if label == "quick" and device == "cpu" and rounds < QUICK_CPU_MIN_ROUNDS:
        print(f"bench: --preset quick on the CPU times at least {QUICK_CPU_MIN_ROUNDS} rounds "
              f"(its figures are the minimum of {QUICK_CPU_MIN_ROUNDS} interleaved rounds); "
              f"--rounds {rounds} raised to {QUICK_CPU_MIN_ROUNDS}", file=sys.stderr)
        rounds = QUICK_CPU_MIN_ROUNDS
    providers = args.providers
    if "static" not in providers:
        providers = ["static", *providers]
    out_csv = os.path.join(args.out, device_slug(device),
                           PRESET_CSV.get(label, f"bench_{label}.csv"))
    if args.dry_run:
        print(f"dry run: {len(cases)} cases x providers {','.join(providers)} x modes "
              f"{','.join(args.modes)} on {device} ({device_name(device)}), {rounds} rounds"
              f"; allocator: {allocator_words(args.allocator)}")
        for case in cases:
            print(f"  {case.group:8s} {case.shape.name:22s} {case.shape.label():26s} "
                  f"batch={case.batch:<4d} K={case.experts:<3d} {case.dtype:5s} {case.layout}"
                  + ("  memory only" if not case.timing and device == "cpu"
                     and not args.no_memory else "  (memory only: skipped)" if not case.timing
                     else "  +memory" if case.memory and not args.no_memory else ""))
        reason = triton_unavailable_reason(device)
        if "triton" in providers and reason:
            print(f"  (provider triton would be skipped: {reason})")
        for provider, group in PROVIDER_GROUPS.items():
            if provider in providers:
                print(f"  (provider {provider} runs on the {group} group only)")
        reason = timm_unavailable_reason()
        if "timm" in providers and reason:
            print(f"  (provider timm would be skipped: {reason})")
        print(f"would write {out_csv}")
        return 0
    run(cases, providers, device, rounds, out_csv, label, memory=not args.no_memory,
        progress=not args.no_progress, time_budget_s=args.time_budget, rep_ms=args.rep_ms,
        sample_ms=args.sample_ms, isolate=args.isolate,
        modes=args.modes)
    print(f"bench: wrote {out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

