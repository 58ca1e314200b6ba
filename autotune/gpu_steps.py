"""The work of ``gpu-check`` (:mod:`.gpu_check` plans and runs it): the cases, the pinned configs,
what each case launches and compiles, the correctness pass and the timings.

Every function here runs on a GPU and, for the tests, on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``) with tiny shapes.

Pinned configs. The first pass launches one or two configs per kernel (:func:`pinned_configs`),
chosen from ``dynconv.kernels.configs``' candidates, so that nothing is autotuned and every
launch can be compiled ahead. They are pinned through the kernels' tuned-table hook: each
launch's exact autotune key is found by driving the launchers under
:func:`dynconv.kernels.tuned_table.forcing` (on meta tensors, or under the interpreter on CPU
tensors, without running a kernel: :func:`pinned_entries`), and the (key -> config) entries are
written as a tuned table that ``DYNCONV_TUNED_DIR`` points to. A table, not ``forcing`` itself,
because ``forcing`` is thread-local and autograd runs a CUDA graph's backward on its own thread.

Precompiling. :func:`compile_jobs` captures what each case launches with those configs
(:mod:`.launch_capture`: the real launchers on meta tensors, specialised by Triton's binder) and
:func:`compile_worker` compiles one job in a worker process (:func:`.compile_check.compile_job`,
the ``triton.compile`` call that ``JITFunction.run`` makes, so the disk cache it fills is the one
a later launch reads), then builds the job's C launcher where the Triton version compiles one per
signature (3.6 does, with gcc, at first launch).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from . import bench
from .launch_capture import speech_1d, video_3d
from .shapes import ConvShape, find_layer, planar, tiny
from .tolerance import reduction_lengths, relative_tolerance

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Every tuned Triton kernel that the backend launches (each pinned by pinned_configs).
TRITON_KERNELS = ("mix", "conv_fwd", "conv_fwd_spanning", "conv_fwd_tma", "conv_bwd_dx",
                  "conv_bwd_dw")

# --- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckCase:
    """One correctness case: triton (``strategy`` forced) against native in float64."""

    shape: ConvShape
    batch: int
    experts: int
    dtype: str
    layout: str  # "channels_last" or "nchw"
    strategy: str  # the forward's: one of FORWARD_STRATEGIES
    bias: bool = True
    tf32: bool = False  # fp32 only: torch.backends.cudnn.allow_tf32 during the triton run
    backward: str = "per_sample"  # the backward's: one of BACKWARD_STRATEGIES
    # ODConv: triton with in_scale, out_scale and tap_scale against the published formulation
    # (bench.odconv_published) in float64, the scales' gradients too
    odconv: bool = False

    @property
    def label(self) -> str:
        layout = "cl" if self.layout == "channels_last" else "nchw"
        extra = ("" if self.bias else " nobias") + (" tf32" if self.tf32 else "")
        if self.backward != "per_sample":
            extra += f" bwd={self.backward}"
        if self.odconv:
            extra += " odconv"
        return (f"{self.shape.label()} B{self.batch} K{self.experts} {self.dtype} {layout} "
                f"{self.strategy}{extra}")


def _resnet(name: str) -> ConvShape:
    return find_layer("resnet18", name)


def check_cases(tiny_shapes: bool = False) -> list[CheckCase]:
    """About 40 correctness cases.

    Seven small geometries (3x3 s1, 3x3 s2, 1x1 s2 without bias, grouped, depthwise, the 7x7 s2
    stem with 3 input channels, a dilated one with few channels) x bf16 / fp16 / fp32 (ieee dots)
    x premix / fused (and the batch-spanning strategy for one dtype per geometry, rotating), with
    K = 4, 17 or 1 per geometry and channels_last / NCHW alternating; then four ResNet-18 layers
    at batch 32 with the configs the timings use (bf16 premix at 128@28, bf16 fused at 512@7,
    fp32 tf32 at 256@14, bf16 spanning on the 1x1 stride-2 downsample at 56x56); then two
    ODConv cases (the three scales, against the published formulation).
    ``tiny_shapes``: a handful of miniatures, for the interpreter.
    """
    geometries = [
        (ConvShape("3x3-s1", 16, 32, 9, 9, 3, 3, 1, 1), 4, True),
        (ConvShape("3x3-s2", 16, 32, 11, 10, 3, 3, 2, 1), 17, True),
        (ConvShape("1x1-s2", 32, 64, 9, 9, 1, 1, 2, 0), 1, False),
        (ConvShape("grouped", 32, 32, 8, 8, 3, 3, 1, 1, 1, 2), 4, True),
        (ConvShape("depthwise", 24, 24, 8, 8, 3, 3, 1, 1, 1, 24), 17, True),
        (ConvShape("stem-7x7-s2", 3, 16, 20, 20, 7, 7, 2, 3), 1, True),
        (ConvShape("dilated", 5, 7, 9, 8, 3, 3, 1, 2, 2), 4, True),
    ]
    cases = []
    batch = 2 if tiny_shapes else 3
    for g, (shape, experts, bias) in enumerate(geometries):
        if tiny_shapes:
            shape = tiny(shape, 6, 6)
        for d, dtype in enumerate(("bf16", "fp16", "fp32")):
            for s, strategy in enumerate(("premix", "fused")):
                layout = "channels_last" if (g + d + s) % 2 == 0 else "nchw"
                cases.append(CheckCase(shape, batch, experts, dtype, layout, strategy, bias))
    for g, (shape, experts, bias) in enumerate(geometries):
        if not tiny_shapes:
            dtype = ("bf16", "fp16", "fp32")[g % 3]
            layout = "channels_last" if g % 2 == 0 else "nchw"
            cases.append(CheckCase(shape, batch, experts, dtype, layout, "spanning", bias))
    for g, (shape, experts, bias) in enumerate(geometries):
        if not tiny_shapes:  # the batch-spanning form on PyTorch's convolutions, both ways
            dtype = ("fp16", "fp32", "bf16")[g % 3]
            layout = "nchw" if g % 2 == 0 else "channels_last"
            cases.append(CheckCase(shape, batch, experts, dtype, layout, "spanning_torch", bias,
                                   backward="spanning_torch"))
    if not tiny_shapes:
        # premix on TMA descriptors (sm_90+; stride 1, groups 1, 2-byte channels_last, channels
        # multiples of 8): partial channel chunks and boxes, padding 2 with dilation 2, K = 17.
        cases += [
            CheckCase(geometries[0][0], batch, 4, "bf16", "channels_last", "premix_tma"),
            CheckCase(geometries[0][0], batch, 4, "fp16", "channels_last", "premix_tma", False),
            CheckCase(ConvShape("dilated-tma", 24, 40, 11, 9, 3, 3, 1, 2, 2), batch, 17, "bf16",
                      "channels_last", "premix_tma"),
        ]
    layers = [
        CheckCase(_resnet("layer2.0.conv2"), 32, 4, "bf16", "channels_last", "premix"),
        CheckCase(_resnet("layer4.0.conv2"), 32, 4, "bf16", "channels_last", "fused"),
        CheckCase(_resnet("layer3.0.conv2"), 32, 4, "fp32", "channels_last", "premix",
                  tf32=True),
        CheckCase(_resnet("layer2.0.downsample"), 32, 4, "bf16", "channels_last", "spanning"),
        CheckCase(_resnet("layer4.0.conv2"), 32, 4, "bf16", "channels_last", "premix_tma"),
        CheckCase(_resnet("layer4.0.conv2"), 32, 4, "bf16", "channels_last", "premix",
                  backward="spanning_torch"),
        CheckCase(_resnet("layer1.0.conv1"), 32, 4, "bf16", "channels_last", "spanning_torch",
                  backward="spanning_torch"),
        CheckCase(_resnet("layer3.0.conv2"), 32, 4, "fp32", "channels_last", "fused",
                  tf32=True, backward="spanning_torch"),
        # the 1-D and 3-D front ends (dynamic_conv1d / dynamic_conv3d over the 2-D kernels)
        CheckCase(speech_1d(), 32, 4, "bf16", "channels_last", "premix"),
        CheckCase(video_3d(), 8, 4, "bf16", "channels_last", "fused"),
    ]
    # ODConv's scales (in, out, tap) on triton against the published formulation
    # (premix: the strategy whose mixing takes the tap scale where the backend takes it)
    odconv = [CheckCase(geometries[0][0], batch, 4, "bf16", "channels_last", "premix",
                        odconv=True),
              CheckCase(geometries[1][0], batch, 4, "fp32", "nchw", "premix", odconv=True)]
    if tiny_shapes:
        # one case per geometry (dtype, strategy and layout rotating), one miniature layer,
        # one ODConv case
        picked = [cases[6 * g + (g % 6)] for g in range(len(geometries))]
        layer = layers[0]
        return picked + [CheckCase(tiny(layer.shape, 8, 6), 2, 4, "bf16", "channels_last",
                                   "premix"),
                         CheckCase(tiny(odconv[0].shape, 4, 5), 2, 2, "bf16", "channels_last",
                                   "premix", odconv=True)]
    return cases + layers + odconv


# ResNet-18 layers of the timings, late ones first (where the design is weakest): a run cut
# short keeps them.
TIMED_LAYERS = ("layer4.0.conv2", "layer3.0.conv2", "layer2.0.conv2", "layer1.0.conv1",
                "layer3.0.conv1", "layer3.0.downsample")
TIMING_PROVIDERS = ("static", "grouped", "triton", "triton-premix", "triton-fused",
                    "triton-spanning", "triton-premix_tma", "triton-spanning_torch",
                    "triton-bwd_spanning", "spanning-torch")
# the ODConv timings (bench's odconv group): the static conv, the published formulation and
# the library's ODConv on auto (triton on a GPU); no profiles, no strategy timings
ODCONV_TIMING_PROVIDERS = ("static", bench.ODCONV_PUBLISHED, "odconv_auto")
ODCONV_TIMED_LAYERS = ("layer4.0.conv2", "layer1.0.conv1")
# providers whose kernels are profiled one by one
PROFILED_PROVIDERS = ("static", "triton-premix", "triton-fused", "triton-spanning",
                      "triton-premix_tma", "triton-bwd_spanning")
# The Triton backend's forward strategies (dynconv.backends.triton.strategy.FORWARD_STRATEGIES).
FORWARD_STRATEGIES = ("premix", "fused", "spanning", "premix_tma", "spanning_torch")
# What each ``triton-...`` provider forces: (forward strategy, backward strategy); None: auto.
# ``triton`` is auto both ways (the rule, as a user without a tuned table gets it);
# ``triton-bwd_spanning``: auto forward with the batch-spanning backward on PyTorch's
# convolutions.
TRITON_PROVIDERS = {
    "triton": (None, None),
    **{f"triton-{s}": (s, "spanning_torch" if s == "spanning_torch" else None)
       for s in FORWARD_STRATEGIES},
    "triton-bwd_spanning": (None, "spanning_torch"),
}
# The strategy that runs only where TMA can address the convolution (tma_eligible).
TMA_STRATEGY = "premix_tma"


def tma_eligible(shape: ConvShape, dtype: str, channels_last: bool, device) -> bool:
    """Whether the premix_tma strategy can run this convolution on ``device`` (sm_90+, stride 1,
    groups 1, bf16 / fp16 channels_last, channels multiples of 8); elsewhere gpu-check leaves it
    out instead of recording an error."""
    from dynconv.kernels._common import interpreter_enabled
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma_supported

    plan = planar(shape, 1)
    x = torch.empty(*plan["x"], dtype=DTYPES[dtype], device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bank_shape = (1, shape.cout, shape.cin // shape.groups, *plan["kernel"])
    interpreter = interpreter_enabled() and x.device.type == "cpu"
    return conv_fwd_tma_supported(x, bank_shape, plan["stride"], shape.groups, interpreter)


def case_providers(case: bench.Case) -> tuple[str, ...]:
    """The providers gpu-check times on ``case``: ODConv's on the odconv group, else
    TIMING_PROVIDERS (:func:`providers_for` then drops those that cannot run it)."""
    return ODCONV_TIMING_PROVIDERS if case.group == bench.ODCONV_GROUP else TIMING_PROVIDERS


def uses_triton(provider: str, device) -> bool:
    """Whether ``provider`` launches the Triton backend on ``device`` (``odconv_auto`` does on
    a GPU): a case whose kernels failed to compile runs without it."""
    backend = bench.provider_backend(provider)
    return (provider.startswith("triton") or backend == "triton"
            or (backend == "auto" and str(device).startswith("cuda")))


def providers_for(case: bench.Case, providers, device) -> list[str]:
    """``providers`` less ``triton-premix_tma`` where the case is not TMA-eligible, and less
    ``spanning-torch`` (a 2-D formulation) for a 1-D or 3-D case."""
    tma = f"triton-{TMA_STRATEGY}"
    kept = list(providers)
    if tma in kept and not tma_eligible(case.shape, case.dtype,
                                        case.layout == "channels_last", device):
        kept.remove(tma)
    if case.shape.spatial_dims != 2 and "spanning-torch" in kept:
        kept.remove("spanning-torch")
    return kept


def timing_cases(tiny_shapes: bool = False) -> list[bench.Case]:
    """The decisive timings: 512@7, 256@14, 128@28, 64@56, the 3x3 stride-2 and the 1x1 stride-2
    downsample (128 -> 256 at 28x28) at batch 32, bf16, channels_last; then 64@56 and 256@14 in
    NCHW, 256@14 in fp32, 512@7 and 64@56 at batch 128; then a speech-like 1-D layer (batch 32)
    and a video-like 3-D one (batch 8) against cuDNN's F.conv1d / F.conv3d; last, ODConv (group
    ``odconv``: the library's against the published formulation) on 512@7 and 64@56 at batch
    32."""
    b32 = [bench.Case("b32-bf16-cl", _resnet(n), 32, 4, "bf16", "channels_last")
           for n in TIMED_LAYERS]
    more = [bench.Case("nchw", _resnet(n), 32, 4, "bf16", "nchw")
            for n in ("layer1.0.conv1", "layer3.0.conv2")]
    more += [bench.Case("fp32", _resnet("layer3.0.conv2"), 32, 4, "fp32", "channels_last")]
    more += [bench.Case("b128", _resnet(n), 128, 4, "bf16", "channels_last")
             for n in ("layer4.0.conv2", "layer1.0.conv1")]
    more += [bench.Case("1d-3d", speech_1d(), 32, 4, "bf16", "channels_last"),
             bench.Case("1d-3d", video_3d(), 8, 4, "bf16", "channels_last")]
    # ODConv's scales: the library's against the published formulation (and static), last
    more += [bench.Case(bench.ODCONV_GROUP, _resnet(n), 32, 4, "bf16", "channels_last")
             for n in ODCONV_TIMED_LAYERS]
    if tiny_shapes:
        return [bench.Case(c.group, tiny(c.shape, 8, 6), 2, c.experts, c.dtype, c.layout,
                           memory=False) for c in (b32[0], more[0], more[-1])]
    return b32 + more


def sweep_shapes() -> list[ConvShape]:
    """The sweep's layers (time left only): the timed ResNet-18 layers (late ones first), then
    the rest of ResNet-18's distinct layers but its 3-channel stem, as far as the time goes."""
    from .shapes import get_shape_set

    timed = [_resnet(n) for n in TIMED_LAYERS]
    rest = [s for s in get_shape_set("resnet18") if s.cin > 3 and s.name not in TIMED_LAYERS]
    return timed + rest[::-1]


# --- pinned configs ----------------------------------------------------------------------------

# Preferred (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM-tiled kernels: large
# tiles with 3 stages (wgmma-sized, cp.async-pipelined) where the problem fills them, a 64x64
# tile otherwise. conv_fwd: M = output pixels, N = C_out/G; conv_bwd_dx: M = input pixels,
# N = C_in/G.
BIG_TILE = (128, 128, 32, 8, 3)
SMALL_TILE = (64, 64, 32, 4, 3)
# mix: (BLOCK_B, BLOCK_N, num_warps); conv_bwd_dw: (BLOCK_P, num_warps, num_stages) in order of
# preference, the first that compiles without spills for the launch's K_BLOCK and dtype.
MIX_TILE = (32, 128, 4)
DW_PREFERENCE = ((64, 8, 3), (32, 8, 3), (32, 4, 3))
# conv_fwd_spanning: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); conv_fwd_tma: (BLOCK_H,
# BLOCK_W, BLOCK_N, BLOCK_K, num_warps, num_stages). None is an sm_90-only config, so the choice
# is the same whichever capability the launch is pruned for.
SPANNING_PREFERENCE = ((128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3))
TMA_PREFERENCE = ((8, 16, 128, 64, 8, 3), (8, 8, 128, 64, 4, 4), (8, 8, 64, 64, 4, 4))


def _tile_of(config) -> tuple:
    kw = config.kwargs
    if "BLOCK_P" in kw:
        return (kw["BLOCK_P"], config.num_warps, config.num_stages)
    if "BLOCK_B" in kw:
        return (kw["BLOCK_B"], kw["BLOCK_N"], config.num_warps)
    if "BLOCK_H" in kw:
        return (kw["BLOCK_H"], kw["BLOCK_W"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps,
                config.num_stages)
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)


class PrunedChoice:
    """A pinned config that depends on the launch (a callable for ``tuned_table.forcing``): the
    first preferred tile among the candidates that the kernel's own ``early_config_prune``
    keeps for that launch, else the first it keeps. For the kernels whose valid configs depend
    on more than the shape and dtype (fp32 ieee dots, int64 offsets, the layout, TMA boxes)."""

    def __init__(self, candidates, prune, preferences):
        self.candidates, self.prune, self.preferences = list(candidates), prune, preferences

    def __call__(self, named: dict, kwargs: dict):
        kept = self.prune(self.candidates, named, **kwargs) or self.candidates
        return _pick(kept, self.preferences)

    def __str__(self) -> str:
        return "pruned per launch, preferring " + " | ".join(
            "x".join(map(str, tile)) for tile in self.preferences)


def _pick(candidates, preferences, fits=lambda c: True):
    """The first candidate config matching a preference (in order) that ``fits``; else the
    first candidate that fits; else the first candidate (what the kernels' prunes keep)."""
    by_tile = {_tile_of(c): c for c in candidates}
    for tile in preferences:
        if tile in by_tile and fits(by_tile[tile]):
            return by_tile[tile]
    return next((c for c in candidates if fits(c)), candidates[0])


def pinned_configs(shape: ConvShape, experts: int, dtype: str) -> dict:
    """{kernel name: triton.Config} of the first pass for one convolution."""
    from dynconv.kernels import configs as kc

    c_in_g, c_out_g = shape.cin // shape.groups, shape.cout // shape.groups
    fwd_big = c_out_g >= 128 and shape.ho * shape.wo >= 128
    dx_big = c_in_g >= 128 and shape.h * shape.w >= 128
    k_block = kc.conv_bwd_dw_expert_block(experts)
    element_size = DTYPES[dtype].itemsize
    dw_tile = kc.conv_bwd_dw_tile_shape(experts, c_out_g, c_in_g * shape.kh * shape.kw,
                                        element_size=element_size)
    # Each kernel's own candidates (the interpreter's one under the interpreter), pruned per
    # launch by the kernel's own hook: a pin is a config the autotuner itself could pick (fp32
    # tiles that spill, int64-offset and pre-sm_90 limits, TMA boxes are all pruned there).
    dw_fits = [c for c in kc.conv_bwd_dw_configs(interpreter=False)
               if kc.conv_bwd_dw_config_fits(c, k_block, element_size, dw_tile)]
    dw_preference = [t for t in DW_PREFERENCE if t in {_tile_of(c) for c in dw_fits}]
    return {
        "mix": PrunedChoice(kc.mix_configs(), kc.prune_mix_configs, [MIX_TILE]),
        "conv_fwd": PrunedChoice(kc.conv_fwd_configs(), kc.prune_conv_fwd_configs,
                                 [BIG_TILE if fwd_big else SMALL_TILE, SMALL_TILE]),
        "conv_bwd_dx": PrunedChoice(kc.conv_bwd_dx_configs(), kc.prune_conv_bwd_dx_configs,
                                    [BIG_TILE if dx_big else SMALL_TILE, SMALL_TILE]),
        "conv_bwd_dw": PrunedChoice(kc.conv_bwd_dw_configs(), kc.prune_conv_bwd_dw_configs,
                                    dw_preference or DW_PREFERENCE),
        "conv_fwd_spanning": PrunedChoice(kc.conv_fwd_spanning_configs(),
                                          kc.prune_conv_fwd_spanning_configs,
                                          SPANNING_PREFERENCE),
        "conv_fwd_tma": PrunedChoice(kc.conv_fwd_tma_configs(), kc.prune_conv_fwd_tma_configs,
                                     TMA_PREFERENCE),
    }


def config_text(config) -> str:
    if isinstance(config, PrunedChoice):
        return str(config)
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


@contextlib.contextmanager
def pinned(shape: ConvShape, experts: int, dtype: str):
    """Within the block (this thread), launches use :func:`pinned_configs`; yields
    {kernel: the forcing's list of (key, named args, kwargs) per launch}."""
    from dynconv.kernels import tuned_table

    with contextlib.ExitStack() as stack:
        logs = {name: stack.enter_context(tuned_table.forcing(name, config))
                for name, config in pinned_configs(shape, experts, dtype).items()}
        yield logs


def _tuned_kernels() -> dict:
    import importlib

    return {name: getattr(importlib.import_module(f"dynconv.kernels.{name}"), f"{name}_tuned")
            for name in TRITON_KERNELS}


def config_sources(reset: bool = False) -> str:
    """Where each Triton kernel's latest launch took its config ("table": the pinned table;
    "forced"; "autotune": not pinned), e.g. ``mix:table conv_fwd:table``; ``reset`` forgets."""
    kernels = _tuned_kernels()
    text = " ".join(f"{name}:{k.last_source}" for name, k in kernels.items() if k.last_source)
    if reset:
        for kernel in kernels.values():
            kernel.last_source = None
    return text


@contextlib.contextmanager
def forced_strategy(strategy: str | None, backward: str | None = None):
    """The Triton backend's forward uses ``strategy`` (one of FORWARD_STRATEGIES), and its
    backward ``backward``, where given, within the block (:func:`dynconv.use_strategy`), so calls
    still go through the dispatcher and the custom op as a user's do."""
    from dynconv.backends.triton.strategy import use_strategy

    with use_strategy(forward=strategy, backward=backward):
        yield


class RealLaunchError(RuntimeError):
    """A kernel would have run while gpu-check only meant to record launch keys."""


def _tuned_kernel_classes() -> list[type]:
    from dynconv.kernels.tuned_table import TunedKernel

    found, todo = [], [TunedKernel]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@contextlib.contextmanager
def _launching_nothing():
    """Within the block no Triton kernel runs: tuned-kernel launches with a config (forced or
    from the table) return at once, after a forced one has logged its key, in every
    ``TunedKernel`` class (the TMA forward's has its own ``_run``); any other way into a kernel
    (the autotuner, which would benchmark every candidate, or a bare ``JITFunction`` /
    interpreted launch) raises :class:`RealLaunchError` instead of launching. On meta tensors a
    real launch would run on null pointers: an illegal address on a GPU, and a CUDA context
    broken for the rest of the process."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def refuse(self, *args, **kwargs):
        name = getattr(getattr(self, "fn", self), "__name__", None) or repr(self)
        raise RealLaunchError(f"gpu-check pinning would launch {name} for real (not pinned): "
                              "every Triton kernel the backend launches must have a pinned "
                              "config (gpu_steps.pinned_configs)")

    patched: list[tuple[type, str, object]] = [(Autotuner, "run", refuse),
                                               (JITFunction, "run", refuse)]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append((InterpretedFunction, "run", refuse))
    except ImportError:
        pass
    patched += [(cls, "_run", lambda self, config, grid, args, kwargs: None)
                for cls in _tuned_kernel_classes() if "_run" in vars(cls)]
    saved = [(cls, name, vars(cls)[name]) for cls, name, _ in patched]
    try:
        for cls, name, stub in patched:
            setattr(cls, name, stub)
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def _pairs(shape: ConvShape) -> tuple:
    """The (stride, padding, dilation, groups) of the 2-D launches a shape makes (a 1-D shape's
    H = 1 view, a 3-D shape's depth planes: :func:`.shapes.planar`)."""
    plan = planar(shape, 1)
    return (plan["stride"], plan["padding"], plan["dilation"], shape.groups)


def launch_inputs(shape: ConvShape, batch: int, experts: int, dtype: str, channels_last: bool,
                  bias: bool, device) -> tuple:
    """Empty (x, bank, routing, bias bank, grad_out) of the 2-D launches of ``shape`` at
    ``batch`` (:func:`.launch_capture.planar_geometry`), laid out as the real runs lay theirs
    out (and as :mod:`.launch_capture` does on meta tensors): contiguous bank (K, C_out, C_in/G,
    kh, kw), routing (B, K) and bias bank (K, C_out); x and grad_out channels_last or NCHW."""
    from .launch_capture import planar_geometry

    x_shape, kernel, *_, grad_shape = planar_geometry(shape, batch)
    options = {"device": device, "dtype": DTYPES[dtype]}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(*x_shape, **options)
    grad_out = torch.empty(*grad_shape, **options)
    return (x.contiguous(memory_format=memory_format),
            torch.empty(experts, shape.cout, shape.cin // shape.groups, *kernel, **options),
            torch.empty(x_shape[0], experts, **options),
            torch.empty(experts, shape.cout, **options) if bias else None,
            grad_out.contiguous(memory_format=memory_format))


@dataclass(frozen=True)
class Launches:
    """What one convolution launches: which forward strategies, and the backward or not."""

    shape: ConvShape
    batch: int
    experts: int
    dtype: str
    channels_last: bool
    bias: bool
    strategies: tuple[str, ...]
    backward: bool = True
    # fp32: torch.backends.cudnn.allow_tf32 (the kernels compile tf32 or ieee dots by it)
    tf32: bool = True
    # ODConv's tap scale (B, kh, kw) handed to the kernels (where the backend takes it)
    tap_scale: bool = False


@contextlib.contextmanager
def tf32_dots(enabled: bool):
    """``torch.backends.cudnn.allow_tf32`` (which the fp32 kernels follow) within the block."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# the forward strategies that take the tap scale (dynconv.backends.triton.forward's
# TAP_SCALE_STRATEGIES; auto runs premix with it)
TAP_SCALE_STRATEGIES = ("premix", "premix_tma")


def odconv_launch(shape: ConvShape, experts: int) -> tuple[int, bool, bool]:
    """(the bank's K, whether it has a bias, whether the tap scale goes to the kernels) of the
    Triton launches of ODConv with all three scales
    (:func:`dynconv.backends.scales.scaled_conv2d`): the bias is added after the output scale,
    outside the backend; a backend that takes the tap scale gets the bank and the tap scale,
    any other the bank folded per tap (K x kh x kw experts)."""
    from dynconv.backends.registry import get_backend

    if get_backend("triton").takes_tap_scale:
        return experts, False, True
    return experts * shape.kh * shape.kw, False, False


def launches_of_check(case: CheckCase) -> Launches:
    if not case.odconv:
        return Launches(case.shape, case.batch, case.experts, case.dtype,
                        case.layout == "channels_last", case.bias, (case.strategy,),
                        tf32=case.tf32)
    experts, bias, tap = odconv_launch(case.shape, case.experts)
    return Launches(case.shape, case.batch, experts, case.dtype, case.layout == "channels_last",
                    bias, (case.strategy,), tf32=case.tf32, tap_scale=tap)


def launches_of_timing(case: bench.Case) -> Launches:
    if case.group != bench.ODCONV_GROUP:
        return Launches(case.shape, case.batch, case.experts, case.dtype,
                        case.layout == "channels_last", True, FORWARD_STRATEGIES)
    experts, bias, tap = odconv_launch(case.shape, case.experts)
    return Launches(case.shape, case.batch, experts, case.dtype, case.layout == "channels_last",
                    bias, TAP_SCALE_STRATEGIES if tap else FORWARD_STRATEGIES, tap_scale=tap)


def _drive(launch: Launches, device) -> None:
    """Run the Triton backend's forward (each strategy) and backward once on empty inputs."""
    from dynconv.backends.triton.backward import triton_backward_impl
    from dynconv.backends.triton.forward import triton_forward_impl

    x, bank, routing, bias, grad_out = launch_inputs(
        launch.shape, launch.batch, launch.experts, launch.dtype, launch.channels_last,
        launch.bias, device)
    # ODConv's tap scale, where the kernels take it (the keyword only then)
    tap = ({"tap_scale": x.new_empty(x.shape[0], *bank.shape[-2:])} if launch.tap_scale
           else {})
    for strategy in launch.strategies:
        if strategy == TMA_STRATEGY and not tma_eligible(launch.shape, launch.dtype,
                                                         launch.channels_last, x.device):
            continue
        triton_forward_impl(x, bank, routing, bias, *_pairs(launch.shape), strategy=strategy,
                            **tap)
    if launch.backward:
        triton_backward_impl(grad_out, x, bank, routing, bias, *_pairs(launch.shape),
                             [True, True, True, launch.bias] + ([True] if tap else []), **tap)


def pinned_entries(launches: list[Launches], device) -> dict:
    """{kernel: {autotune key: config dict}} for every launch of ``launches`` with its pinned
    config, found without running a kernel: the launchers are driven on empty tensors of
    ``device`` ("meta" for a GPU's launches; "cpu" under the interpreter, whose keys differ)."""
    from dynconv.kernels import tuned_table

    entries: dict[str, dict] = defaultdict(dict)
    with _launching_nothing():
        for launch in launches:
            configs = pinned_configs(launch.shape, launch.experts, launch.dtype)
            with pinned(launch.shape, launch.experts, launch.dtype) as logs, \
                    tf32_dots(launch.tf32):
                _drive(launch, device)
            for name, log in logs.items():
                for key, named, kwargs in log:
                    config = configs[name]
                    if callable(config):  # a PrunedChoice: the config this launch took
                        config = config(named, kwargs)
                    entries[name][key] = {"config": tuned_table.config_to_dict(config),
                                          "pinned": "gpu-check first pass"}
    return dict(entries)


def write_pinned_table(entries: dict, device, folder: str) -> str:
    """Write ``entries`` as the tuned table of ``device`` in ``folder``; returns its path.
    Point ``DYNCONV_TUNED_DIR`` at ``folder`` (and clear the table cache) to use it."""
    import json

    import triton

    from dynconv.kernels import tuned_table

    slug, name = tuned_table.device_id(torch.device(device))
    table = {"format": tuned_table.FORMAT_VERSION, "device": name, "device_slug": slug,
             "triton": triton.__version__, "torch": torch.__version__,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kernels": entries}
    os.makedirs(folder, exist_ok=True)
    path = tuned_table.table_path(slug, folder)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    return path


def compile_jobs(launches: list[Launches], arch: int, pin: bool = True) -> list[list]:
    """For each item of ``launches``, the compile jobs (:class:`.launch_capture.CompileJob`) of
    what it launches on a GPU of compute capability ``arch``: with the pinned configs, or
    (``pin=False``) with every candidate the autotuner would try. Needs Triton's compiler (not
    the interpreter); captures on meta tensors, no GPU needed."""
    from .launch_capture import DrivenCase, capture, specialise

    result = []
    for launch in launches:
        wanted = {f"fwd-{s}" for s in launch.strategies} | ({"bwd"} if launch.backward else set())
        case = DrivenCase(launch.shape, launch.batch, launch.experts, launch.dtype,
                          launch.channels_last, launch.bias, tap_scale=launch.tap_scale)
        pins = (pinned(launch.shape, launch.experts, launch.dtype) if pin
                else contextlib.nullcontext())
        with pins, tf32_dots(launch.tf32):
            captured = capture([case], arch)
        jobs = {}
        for item in captured:
            if item.label.rsplit(" ", 1)[-1] in wanted:
                job = specialise(item, arch)
                jobs.setdefault(job.key, job)
        result.append(list(jobs.values()))
    return result


def warm_launcher(job) -> str:
    """Build (into Triton's cache) the C launcher of a compiled job, where this Triton builds
    one per kernel signature at the first launch (3.6 does, with gcc); a cache hit for the
    kernel itself. Returns what happened."""
    try:
        from triton.backends.nvidia import driver as nvidia
    except ImportError as exc:
        return f"no nvidia backend ({exc})"
    if not hasattr(nvidia, "make_launcher"):
        return "generic launcher: nothing to build"
    try:
        import importlib

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = getattr(importlib.import_module(job.module), job.kernel)
        compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                                  target=GPUTarget("cuda", job.arch, 32), options=job.options)
        nvidia.CudaLauncher(compiled.src, compiled.metadata)
    except Exception as exc:  # reported in the CSV; the launch will build it instead
        return f"not built: {_first_line(exc)}"
    return "built"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:120]}"


def compile_worker(job) -> dict:
    """Compile one job in a worker process: a row of the precompile CSV."""
    from .compile_check import compile_job, row_values

    start = time.perf_counter()
    result = compile_job(job)
    note = ""
    if result.error and result.error.startswith("cuobjdump not found"):
        note, result.error = "compiled; registers and SASS unknown (no cuobjdump)", None
    launcher = warm_launcher(job) if result.error is None else ""
    row = row_values(result)
    row.update(launcher=launcher, note=note, wall_s=round(time.perf_counter() - start, 2))
    return row


def warm_driver_utils() -> str:
    """Build Triton's CUDA utility module (driver.c, gcc) into the cache, once, in a worker."""
    try:
        from triton.backends.nvidia import driver as nvidia

        nvidia.CudaUtils()
    except Exception as exc:
        return f"not built: {_first_line(exc)}"
    return "built"


# --- correctness -------------------------------------------------------------------------------

ATOL = 1e-6
GRADIENTS = ("grad_x", "grad_bank", "grad_routing", "grad_bias")


def case_reduction_lengths(case: CheckCase) -> tuple[int, int]:
    """(forward, backward) reduction lengths of a correctness case (:mod:`.tolerance`; a 3-D
    kernel's depth taps count as more rows of taps)."""
    s = case.shape
    return reduction_lengths(case.batch, s.cin, s.cout, (s.kd * s.kh, s.kw), s.groups,
                             case.experts, s.do * s.ho * s.wo)


def _draw(shape, generator, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def check_inputs(case: CheckCase, device) -> tuple:
    """(x, bank, routing, bias bank or None, grad_out): drawn in float64 from a fixed seed,
    rounded to the case's dtype, on ``device``, x and grad_out in the case's layout."""
    s = case.shape
    generator = torch.Generator().manual_seed(0)
    fan_in = s.cin // s.groups * s.kd * s.kh * s.kw
    x = _draw((case.batch, s.cin, *s.spatial), generator)
    bank = _draw((case.experts, s.cout, s.cin // s.groups, *s.kernel), generator,
                 fan_in**-0.5)
    routing = torch.softmax(_draw((case.batch, case.experts), generator), dim=1)
    bias = _draw((case.experts, s.cout), generator) if case.bias else None
    grad_out = _draw((case.batch, s.cout, *s.out_spatial), generator)
    dtype = DTYPES[case.dtype]
    move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    layout = bench.channels_last if case.layout == "channels_last" else torch.Tensor.contiguous
    return (layout(move(x)), move(bank), move(routing), move(bias), layout(move(grad_out)))


def _native_float64(tensors, grad_out, shape: ConvShape, transform):
    """y and the gradients of the native backend in float64 on ``transform``-ed copies."""
    leaves = [None if t is None else transform(t.detach().double()).requires_grad_(True)
              for t in tensors]
    y = bench.dynamic_conv_of(shape)(*leaves, shape.stride, shape.padding, shape.dilation,
                               shape.groups, backend="native")
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, transform(grad_out.detach().double()))
    return y.detach(), list(grads)


CHECK_COLUMNS = ["case", "layer", "shape", "batch", "experts", "dtype", "layout", "strategy",
                 "bias", "tf32", "tensor", "status", "worst_error_over_bound", "max_error",
                 "max_reference", "rtol", "reduction_length", "configs", "config_sources",
                 "seconds", "note"]


ODCONV_GRADIENTS = ("grad_in_scale", "grad_out_scale", "grad_tap_scale")
# ODConv's elementwise passes (x and y scaled, the bias added after) round low-precision
# results a few more times than the plain convolution: its bound allows for them
ODCONV_ROUNDINGS = 8


def odconv_check_scales(case: CheckCase, device) -> list:
    """ODConv's (in_scale, out_scale, tap_scale) of a correctness case: sigmoids of float64
    draws from their own fixed seed, rounded to the case's dtype, on ``device``."""
    s = case.shape
    generator = torch.Generator().manual_seed(1)
    sizes = ((case.batch, s.cin), (case.batch, s.cout), (case.batch, s.kh, s.kw))
    return [torch.sigmoid(_draw(size, generator)).to(device, DTYPES[case.dtype])
            for size in sizes]


def _published_float64(tensors, scales, grad_out, shape: ConvShape, transform):
    """y and the gradients of ODConv's published formulation in float64 on ``transform``-ed
    copies (x, bank, routing, bias, then the three scales)."""
    leaves = [None if t is None else transform(t.detach().double()).requires_grad_(True)
              for t in [*tensors, *scales]]
    x, bank, routing, bias, *scaled = leaves
    y = bench.odconv_published(x, bank, routing, bias, shape.stride, shape.padding,
                               shape.dilation, shape.groups, *scaled)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, transform(grad_out.detach().double()))
    return y.detach(), list(grads)


def run_check(case: CheckCase, device) -> list[dict]:
    """Rows (y and each gradient) of one case: triton against native in float64 (an ODConv
    case: triton with the three scales against the published formulation in float64, the
    scales' gradients too), each element within the bound; an exception gives one row with
    status ``error``."""
    s = case.shape
    base = {"case": case.label, "layer": s.name, "shape": s.label(), "batch": case.batch,
            "experts": case.experts, "dtype": case.dtype, "layout": case.layout,
            "strategy": case.strategy, "bias": case.bias, "tf32": case.tf32,
            "configs": "; ".join(f"{k} {config_text(c)}" for k, c in
                                 pinned_configs(s, case.experts, case.dtype).items())}
    start = time.perf_counter()
    try:
        *tensors, grad_out = check_inputs(case, device)
        odconv = odconv_check_scales(case, device) if case.odconv else []
        leaves = [t.requires_grad_(True) for t in [*tensors, *odconv] if t is not None]
        keywords = (dict(zip(("in_scale", "out_scale", "tap_scale"), odconv)) if case.odconv
                    else {})
        config_sources(reset=True)
        with tf32_dots(case.tf32), forced_strategy(case.strategy, case.backward):
            y = bench.dynamic_conv_of(s)(*tensors, s.stride, s.padding, s.dilation, s.groups,
                                   backend="triton", **keywords)
            got = [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]
        base["config_sources"] = config_sources()
        if case.odconv:
            want_y, want_grads = _published_float64(tensors, odconv, grad_out, s, lambda t: t)
            scale_y, scale_grads = _published_float64(tensors, odconv, grad_out, s, torch.abs)
        else:
            want_y, want_grads = _native_float64(tensors, grad_out, s, lambda t: t)
            scale_y, scale_grads = _native_float64(tensors, grad_out, s, torch.abs)
    except Exception as exc:  # a compile or launch failure, a crash: recorded, not raised
        return [{**base, "tensor": "all", "status": "error",
                 "seconds": round(time.perf_counter() - start, 3),
                 "note": f"{type(exc).__name__}: {str(exc).strip()}"[:300]}]
    forward_n, backward_n = case_reduction_lengths(case)
    roundings = {"roundings": ODCONV_ROUNDINGS} if case.odconv else {}
    if case.odconv:  # the folded bank's experts, and the scales' sums
        folded = odconv_launch(s, case.experts)[0]
        forward_n += folded + 4
        backward_n += folded + s.h * s.w + 4
    gradients = [g for g, t in zip(GRADIENTS, tensors) if t is not None]
    names = ["y", *gradients, *(ODCONV_GRADIENTS if case.odconv else ())][: len(got)]
    wants, scales = [want_y, *want_grads], [scale_y, *scale_grads]
    rows = []
    for name, value, want, scale in zip(names, got, wants, scales):
        n = forward_n if name == "y" else backward_n
        rtol = relative_tolerance(DTYPES[case.dtype], n, case.tf32, **roundings)
        error = (value.double() - want).abs()
        bound = rtol * scale + ATOL
        finite = bool(torch.isfinite(value).all())
        worst = float((error / bound).max()) if error.numel() else 0.0
        ok = finite and value.shape == want.shape and bool((error <= bound).all())
        rows.append({**base, "tensor": name, "status": "ok" if ok else "FAIL",
                     "worst_error_over_bound": f"{worst:.3g}",
                     "max_error": f"{float(error.max()) if error.numel() else 0.0:.3g}",
                     "max_reference": f"{float(want.abs().max()) if want.numel() else 0:.3g}",
                     "rtol": f"{rtol:.3g}", "reduction_length": n,
                     "note": "" if finite else "not finite"})
    seconds = round(time.perf_counter() - start, 3)
    for row in rows:
        row["seconds"] = seconds
    return rows


# --- timings -----------------------------------------------------------------------------------


def provider_forward(provider: str, case: bench.Case, t: dict):
    """bench's forward builder, plus ``triton-<strategy>`` for each of FORWARD_STRATEGIES
    (the Triton backend through the dispatcher with its strategy forced) and ``spanning-torch``
    (the same batch-spanning formulation in PyTorch: one static conv of the routing-scaled
    input over K x Cin channels, plain autograd)."""
    if provider in TRITON_PROVIDERS and provider != "triton":
        forward, leaves = bench.forward_fn("triton", case, t)
        strategy = TRITON_PROVIDERS[provider][0]
        if strategy is None:
            return forward, leaves

        def forced():
            with forced_strategy(strategy):
                return forward()

        return forced, leaves
    if provider == "spanning-torch":
        from dynconv.backends.reference import spanning_dynamic_conv2d
        from dynconv.geometry import ConvGeometry

        s = case.shape
        geometry = ConvGeometry(*_pairs(s))
        leaves = [t["x"], t["bank"], t["routing"], t["bias_bank"]]
        return (lambda: spanning_dynamic_conv2d(*leaves, geometry)), leaves
    return bench.forward_fn(provider, case, t)


def run_timing(case: bench.Case, device: str, timer, rounds: int, memory: bool,
               providers=TIMING_PROVIDERS) -> list[dict]:
    """bench's rows (provider x mode: time, static time in the same rounds, ratio, peak
    memory) of one case, with gpu-check's providers. A provider that forces the backward's
    strategy is measured on its own with that strategy forced for the whole measurement (the
    backward runs outside the forward's call; the static conv it is interleaved with does not
    read it)."""
    plain = [p for p in providers if TRITON_PROVIDERS.get(p, (None, None))[1] is None]
    rows = bench.measure_case(case, plain, device, rounds, timer, memory,
                              forward=provider_forward)
    for provider in providers:
        if provider in plain:
            continue
        with forced_strategy(None, TRITON_PROVIDERS[provider][1]):
            rows += bench.measure_case(case, [provider], device, rounds, timer, memory,
                                       forward=provider_forward)
    order = {p: i for i, p in enumerate(providers)}
    return sorted(rows, key=lambda r: order.get(r["provider"], len(order)))


STRATEGY_COLUMNS = ["group", "layer", "shape", "batch", "experts", "dtype", "layout", "kind",
                    "key", "strategy", "ms", "status", "fastest"]


def strategy_rows(case: bench.Case, device: str) -> list[dict]:
    """One row per (forward / backward) strategy of the ``triton`` backend on the case: its
    median ms as benchmark mode times it, and which was fastest (:mod:`.strategy_timing`)."""
    from .strategy_timing import time_call_strategies

    base = {k: v for k, v in bench.case_columns(case).items() if k in STRATEGY_COLUMNS}
    s = case.shape
    if s.spatial_dims != 2:
        return [{**base, "kind": "all", "status": "skipped: a 1-D / 3-D layer runs its 2-D "
                                                  "launches' strategies (their keys)"}]
    try:
        t = bench.make_inputs(case, device)
        with torch.no_grad():
            leaves = {k: t[k].detach() for k in ("x", "bank", "routing", "bias_bank")}
            grad_out = torch.randn(case.batch, s.cout, s.ho, s.wo, device=device,
                                   dtype=leaves["x"].dtype)
            if case.layout == "channels_last":
                grad_out = grad_out.contiguous(memory_format=torch.channels_last)
            found = time_call_strategies(leaves["x"], leaves["bank"], leaves["routing"],
                                         leaves["bias_bank"], grad_out, (s.stride,) * 2,
                                         (s.padding,) * 2, (s.dilation,) * 2, s.groups)
    except Exception as exc:
        return [{**base, "kind": "all", "status": "error",
                 "strategy": f"{type(exc).__name__}: {exc}"[:300]}]
    rows = []
    for kind, (key, entry) in found.items():
        for name, ms in entry["ms"].items():
            ok = isinstance(ms, float)
            rows.append({**base, "kind": kind, "key": key, "strategy": name,
                         "ms": ms if ok else "", "status": "ok" if ok else str(ms)[:300],
                         "fastest": entry["strategy"] == name})
    return rows


def strategy_table_entries(rows: list[dict]) -> dict:
    """{"forward": {key: entry}, "backward": {key: entry}} of :func:`strategy_rows`' rows:
    the tuned table's ``strategies`` section (entries name the fastest and every time)."""
    entries: dict = {}
    for row in rows:
        if row.get("status") != "ok" or not row.get("key"):
            continue
        entry = entries.setdefault(row["kind"], {}).setdefault(row["key"], {
            "ms": {}, "layer": f"{row['layer']}: {row['shape']}", "batch": row["batch"],
            "experts": row["experts"], "dtype": row["dtype"], "layout": row["layout"],
            "source": "gpu-check"})
        entry["ms"][row["strategy"]] = float(row["ms"])
    for by_key in entries.values():
        for entry in by_key.values():
            entry["strategy"] = min(entry["ms"], key=entry["ms"].get)
    return entries


KERNEL_COLUMNS = ["layer", "shape", "batch", "experts", "dtype", "layout", "provider", "kernel",
                  "calls_per_step", "us_per_step", "share_of_step", "step_us", "clock",
                  "status", "note"]
_SHORT_NAMES = {"mix_kernel": "mix", "conv_fwd_kernel": "conv_fwd",
                "conv_fwd_spanning_kernel": "conv_fwd_spanning",
                "conv_bwd_dx_kernel": "dgrad (conv_bwd_dx)",
                "conv_bwd_dw_kernel": "wgrad (conv_bwd_dw)"}


def profile_kernels(case: bench.Case, provider: str, device: str, iterations: int = 5,
                    top: int = 12) -> list[dict]:
    """Per-kernel times of one forward+backward step of ``provider`` (the mean over
    ``iterations`` steps, after one warm-up): on a GPU each kernel's device time from
    torch.profiler (Triton kernels by their names, PyTorch's and cuDNN's by theirs); on the CPU
    the operators' self CPU time (the interpreter's kernels are not operators)."""
    base = {"layer": case.shape.name, "shape": case.shape.label(), "batch": case.batch,
            "experts": case.experts, "dtype": case.dtype, "layout": case.layout,
            "provider": provider}
    cuda = device == "cuda"
    backward = TRITON_PROVIDERS.get(provider, (None, None))[1]
    try:
        with forced_strategy(None, backward) if backward else contextlib.nullcontext():
            return _profile(case, provider, device, iterations, top, base, cuda)
    except Exception as exc:
        return [{**base, "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}]


def _profile(case, provider, device, iterations, top, base, cuda) -> list[dict]:
    try:
        tensors = bench.make_inputs(case, device)
        forward, leaves = provider_forward(provider, case, tensors)
        step = bench.mode_fn("fwd+bwd", forward, leaves)
        step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            torch.cuda.synchronize()
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iterations):
                step()
            if cuda:
                torch.cuda.synchronize()
        totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
        if cuda:
            for event in prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    totals[event.name][0] += 1
                    totals[event.name][1] += event.time_range.elapsed_us()
            clock = "device (CUPTI)"
        if not totals:
            for avg in prof.key_averages():
                if avg.self_cpu_time_total > 0:
                    totals[avg.key] = [avg.count, avg.self_cpu_time_total]
            clock = "host self CPU time"
    except Exception as exc:
        return [{**base, "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}]
    step_us = sum(total for _, total in totals.values()) / iterations
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])
    rows = []
    for name, (count, total) in ranked[:top]:
        rows.append({**base, "kernel": _SHORT_NAMES.get(name, name[:90]),
                     "calls_per_step": round(count / iterations, 2),
                     "us_per_step": round(total / iterations, 2),
                     "share_of_step": round(total / iterations / step_us, 3) if step_us else "",
                     "step_us": round(step_us, 2), "clock": clock, "status": "ok"})
    if len(ranked) > top:
        rest = sum(total for _, (count, total) in ranked[top:])
        rows.append({**base, "kernel": f"({len(ranked) - top} others)",
                     "us_per_step": round(rest / iterations, 2), "step_us": round(step_us, 2),
                     "clock": clock, "status": "ok"})
    return rows
