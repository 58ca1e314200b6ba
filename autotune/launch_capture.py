"""What really launches: drive the Triton backend's launchers on meta tensors, capture every
kernel launch (each config the autotuner would try), and let Triton's own binder specialise it.

A launch's compiled code depends on more than its config: Triton specialises each argument at
launch (pointers and ints divisible by 16, ints equal to 1, int32 against int64), and those
specialisations decide vector widths, asynchronous copies and pipelining. Signatures written by
hand miss them, so the compile-check compiles what this module captures instead:

1. :func:`driven_cases` lists convolutions (ResNet-18's layers at batch 32, in bf16 / fp16 /
   fp32, channels_last and NCHW, and the small odd shapes of the tests);
2. :func:`capture` runs the backend's real forward (premix, fused and batch-spanning) and
   backward on meta tensors (no memory, no GPU) with ``JITFunction.run`` and
   ``Autotuner.run`` replaced by recorders: every config that survives the autotuner's pruning
   for the target is recorded;
3. :func:`specialise` turns a recorded launch into plain values (signature, constexprs,
   attributes, options) with the binder Triton uses at launch, for one target;
4. :func:`jobs_for` deduplicates them into :class:`CompileJob` values that worker processes
   compile (``python -m dynconv.autotune compile-check``).

Meta tensors have aligned base addresses (as CUDA allocations are) and their views keep their
offsets, so divisibility comes out as on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch

from .shapes import ConvShape, get_shape_set, planar

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DrivenCase:
    """One convolution to drive through the Triton backend."""

    shape: ConvShape
    batch: int
    num_experts: int
    dtype: str
    channels_last: bool
    bias: bool = True
    # fp32 dots: torch.backends.cudnn.allow_tf32 while the case is driven (the fp32 kernels
    # compile tf32 or "ieee" dots by it: kernels/_common.dot_settings); None leaves the setting
    # as the caller has it (autotune/gpu_steps.py sets it around the capture itself).
    tf32: bool | None = None
    # ODConv's tap scale (B, kh, kw) handed to the kernels: then the forward runs the
    # strategies that take it (premix, premix_tma) and the backward computes its gradient too
    tap_scale: bool = False

    @property
    def label(self) -> str:
        layout = "cl" if self.channels_last else "nchw"
        return (f"{self.shape.label()} B{self.batch} K{self.num_experts} {self.dtype} {layout}"
                f"{'' if self.bias else ' nobias'}{' tap' if self.tap_scale else ''}"
                f"{' ieee' if self.tf32 is False else ''}")


def _test_shapes() -> list[ConvShape]:
    """Small odd geometries like the tests' (few channels, groups, dilation, 1x1, 7x7 stem)."""
    return [
        ConvShape("odd", 5, 7, 9, 8, 3, 3, 1, 1),
        ConvShape("stride2-groups", 6, 4, 11, 10, 3, 3, 2, 1, 1, 2),
        ConvShape("depthwise-dilated", 8, 8, 9, 9, 3, 3, 1, 2, 2, 8),
        ConvShape("stem", 3, 16, 32, 32, 7, 7, 2, 3),
    ]


def speech_1d() -> ConvShape:
    """A speech-like 1-D layer: 256 channels, length 1000, kernel 5."""
    return ConvShape("speech-1d", 256, 256, 1, 1000, 1, 5, 1, 2, spatial_dims=1)


def video_3d() -> ConvShape:
    """A video-like 3-D layer: 64 channels, 8 x 56 x 56 frames, kernel 3."""
    return ConvShape("video-3d", 64, 64, 56, 56, 3, 3, 1, 1, spatial_dims=3, d=8, kd=3)


def driven_cases() -> list[DrivenCase]:
    """The convolutions whose launches the compile-check compiles.

    ResNet-18's distinct layers at batch 32, K = 4 in bf16 channels_last (the format the GPU
    benchmark uses); two of them (56x56 and 14x14) in fp32 NCHW, one in fp16 channels_last and
    one in bf16 NCHW, and one with K = 17 (fused in several expert passes); the test shapes in
    fp32 NCHW (and two in bf16) with K = 1, 4 and 17 (a K
    past 16 takes the mix kernel's tl.dot path and two expert blocks in the weight gradient).

    Then a speech-like 1-D layer (batch 32, bf16 channels-innermost) and a video-like 3-D one
    (batch 8, bf16 channels_last_3d), as the 2-D launches they make, and five cases with
    ODConv's tap scale.

    fp32 is driven with tf32 dots (PyTorch's default ``allow_tf32``) and again with them off
    (labels ending in ``ieee``: "ieee" fp32 dots, other specialisations than tf32's): the two
    fp32 NCHW layers, one layer in fp32 channels_last and the fp32 test shapes.
    """
    resnet = {shape.name: shape for shape in get_shape_set("resnet18")}
    cases = [DrivenCase(shape, 32, 4, "bf16", True) for shape in resnet.values()]
    cases += [DrivenCase(resnet["layer1.0.conv1"], 32, 4, "fp32", False),
              DrivenCase(resnet["layer3.0.conv2"], 32, 4, "fp32", False),
              DrivenCase(resnet["layer1.0.conv1"], 32, 4, "fp32", False, tf32=False),
              DrivenCase(resnet["layer3.0.conv2"], 32, 4, "fp32", False, tf32=False),
              DrivenCase(resnet["layer2.0.conv2"], 32, 4, "fp32", True, tf32=False),
              DrivenCase(resnet["layer2.0.conv2"], 32, 4, "fp16", True),
              DrivenCase(resnet["layer2.0.conv1"], 32, 4, "bf16", False, bias=False),
              DrivenCase(resnet["layer3.0.conv2"], 32, 17, "bf16", True)]
    # a 1-D speech-like layer (the 2-D kernels on an H = 1 view) and a 3-D video-like one
    # (one 2-D launch per depth tap over the folded batch x depth planes)
    # (44 specialisations of their own per target for the 1-D one, none for the 3-D one: its
    # planes are ResNet's 64-channel 56x56 layer's)
    cases += [DrivenCase(speech_1d(), 32, 4, "bf16", True),
              DrivenCase(video_3d(), 8, 4, "bf16", True)]
    # ODConv's tap scale (the mix, dgrad and wgrad kernels' HAS_TAP specialisations): a 3x3
    # layer in bf16 channels_last and in fp32 NCHW (tf32 and ieee), the K = 17 layer (two
    # expert blocks in the weight gradient) and the depthwise test shape
    cases += [DrivenCase(resnet["layer2.0.conv2"], 32, 4, "bf16", True, tap_scale=True),
              DrivenCase(resnet["layer3.0.conv2"], 32, 4, "fp32", False, tap_scale=True),
              DrivenCase(resnet["layer3.0.conv2"], 32, 4, "fp32", False, tf32=False,
                         tap_scale=True),
              DrivenCase(resnet["layer3.0.conv2"], 32, 17, "bf16", True, tap_scale=True),
              DrivenCase(_test_shapes()[2], 3, 4, "fp32", False, tap_scale=True)]
    for index, shape in enumerate(_test_shapes()):
        experts = (1, 4, 17)[index % 3]
        cases.append(DrivenCase(shape, 3, experts, "fp32", False))
        cases.append(DrivenCase(shape, 3, experts, "fp32", False, tf32=False))
        if index < 2:
            cases.append(DrivenCase(shape, 2, experts, "bf16", index == 0, bias=False))
    return cases


@dataclass
class Launch:
    """One kernel launch as the launcher made it (config keyword arguments included)."""

    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    label: str


def _hooked_args(arg_names, args, kwargs, config) -> tuple:
    """``args`` as ``config`` launches them: its ``pre_hook`` (which sets the block shapes of
    tensor descriptors in place, e.g. the TMA forward's) run on copies of the descriptors, so
    that each config's launch keeps its own."""
    if config.pre_hook is None:
        return args
    from triton.tools.tensor_descriptor import TensorDescriptor

    copies = tuple(copy.copy(a) if isinstance(a, TensorDescriptor) else a for a in args)
    config.pre_hook({**dict(zip(arg_names, copies)), **kwargs, **config.all_kwargs()})
    return copies


@contextlib.contextmanager
def _recording(launches: list, label_of):
    """Replace Triton's launch entry points by recorders for the duration of the block."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, label_of()))

    def record_autotuner(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        finally:
            self.nargs = None
        for config in configs:
            launches.append(Launch(self.fn, _hooked_args(self.arg_names, args, kwargs, config),
                                   {**kwargs, **config.all_kwargs()}, label_of()))

    saved = (JITFunction.run, Autotuner.run, os.environ.get("DYNCONV_TUNED"))
    JITFunction.run, Autotuner.run = record_jit, record_autotuner
    os.environ["DYNCONV_TUNED"] = "0"  # the tuned table would pick one config: try them all
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("DYNCONV_TUNED", None)
        else:
            os.environ["DYNCONV_TUNED"] = saved[2]


def planar_geometry(shape: ConvShape, batch: int) -> tuple:
    """(x shape, bank kernel, stride, padding, dilation, groups, grad_out shape) of the 2-D
    launches ``shape`` makes at ``batch`` (:func:`.shapes.planar`: a 1-D shape's H = 1 view, a
    3-D shape's folded depth planes)."""
    from dynconv.geometry import output_hw

    plan = planar(shape, batch)
    out = output_hw(plan["x"][2:], plan["kernel"], plan["stride"], plan["padding"],
                    plan["dilation"])
    return (plan["x"], plan["kernel"], plan["stride"], plan["padding"], plan["dilation"],
            shape.groups, (plan["x"][0], shape.cout, *out))


def _meta_inputs(case: DrivenCase):
    shape, dtype = case.shape, DTYPES[case.dtype]
    meta = {"device": "meta", "dtype": dtype}
    x_shape, kernel, *_, grad_shape = planar_geometry(shape, case.batch)
    x = torch.empty(*x_shape, **meta)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    bank = torch.empty(case.num_experts, shape.cout, shape.cin // shape.groups, *kernel, **meta)
    routing = torch.empty(x_shape[0], case.num_experts, **meta)
    bias = torch.empty(case.num_experts, shape.cout, **meta) if case.bias else None
    grad_out = torch.empty(*grad_shape, **meta)
    if case.channels_last:
        grad_out = grad_out.to(memory_format=torch.channels_last)
    return x, bank, routing, bias, grad_out


def capture(cases: list[DrivenCase], capability: int) -> list[Launch]:
    """Every launch (and autotuner candidate) of the forward (premix, fused, spanning, and
    premix_tma where TMA can run it: never below sm_90) and the backward of each case, with
    configs pruned as for a GPU of ``capability``."""
    from dynconv.backends.triton.backward import triton_backward_impl
    from dynconv.backends.triton.forward import triton_forward_impl
    from dynconv.kernels.configs import pruning_for_capability
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma_supported

    launches: list[Launch] = []
    current = {"label": ""}
    with _recording(launches, lambda: current["label"]), pruning_for_capability(capability):
        for case in cases:
            x, bank, routing, bias, grad_out = _meta_inputs(case)
            _x, _kernel, stride, padding, dilation, groups, _out = planar_geometry(
                case.shape, case.batch)
            geometry = (stride, padding, dilation, groups)
            strategies = ["premix"] if case.tap_scale else ["premix", "fused", "spanning"]
            if conv_fwd_tma_supported(x, bank.shape, geometry[0], groups):
                strategies.append("premix_tma")  # sm_90+, stride 1, 2-byte channels_last only
            tap = ({"tap_scale": x.new_empty(x.shape[0], *bank.shape[-2:])} if case.tap_scale
                   else {})
            with _tf32_dots(case.tf32):
                for strategy in strategies:
                    current["label"] = f"{case.label} fwd-{strategy}"
                    triton_forward_impl(x, bank, routing, bias, *geometry, strategy=strategy,
                                        **tap)
                current["label"] = f"{case.label} bwd"
                triton_backward_impl(grad_out, x, bank, routing, bias, *geometry,
                                     [True, True, True, case.bias] + ([True] if tap else []),
                                     **tap)
    return launches


@contextlib.contextmanager
def _tf32_dots(enabled: bool | None):
    """``torch.backends.cudnn.allow_tf32 = enabled`` within the block, restored after (None:
    left as it is)."""
    saved = torch.backends.cudnn.allow_tf32
    if enabled is not None:
        torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@dataclass
class CompileJob:
    """One kernel specialisation to compile for one target: plain values only (picklable)."""

    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    labels: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.module, self.kernel, self.arch, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                repr(sorted(self.options.items())))

    @property
    def config(self) -> str:
        """The launch config, e.g. ``M64 N32 K32 w4 s3`` (block sizes, warps, stages)."""
        blocks = " ".join(f"{name.removeprefix('BLOCK_')[0]}{value}"
                          for name, value in self._named_constexprs().items()
                          if name.startswith("BLOCK_"))
        return f"{blocks} w{self.options['num_warps']} s{self.options['num_stages']}"

    def _named_constexprs(self) -> dict:
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items()
                if len(path) == 1}

    @property
    def specialisation(self) -> str:
        """How Triton specialised the runtime arguments: ``D`` = divisible by 16, ``1`` = equal
        to 1 (compiled as a constant), ``64`` = int64; counted over the pointers and ints."""
        names = list(self.signature)
        named = self._named_constexprs()
        runtime = [n for n in names if self.signature[n] != "constexpr" or named.get(n) == 1
                   and not n.isupper()]
        divisible = sum(1 for path in self.attrs if any(
            attr[0] == "tt.divisibility" for attr in self.attrs[path]))
        ones = sum(1 for n in runtime if self.signature[n] == "constexpr")
        wide = sum(1 for n in names if self.signature[n] == "i64")
        return f"{divisible}D {ones}x1 {wide}xi64 of {len(runtime)}"

    @property
    def dtype(self) -> str:
        pointers = [t for t in self.signature.values() if t.startswith("*")]
        return pointers[0][1:] if pointers else "-"


def specialise(launch: Launch, arch: int) -> CompileJob:
    """The signature, constexprs, attributes and options Triton's binder gives ``launch`` on a
    GPU of compute capability ``arch`` (what ``JITFunction.run`` would compile)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**launch.kwargs, "debug": False}
    try:
        from triton import knobs

        if hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    except ImportError:
        pass
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    return CompileJob(
        module=kernel.fn.__module__, kernel=kernel.fn.__name__, arch=arch,
        signature=dict(signature), constexprs=dict(constexprs),
        attrs={path: [list(a) for a in value] for path, value in attrs.items()},
        options=dict(options.__dict__), labels=[launch.label],
    )


def jobs_for(archs, cases: list[DrivenCase] | None = None) -> list[CompileJob]:
    """The distinct compile jobs of every captured launch, for each target in ``archs``."""
    cases = driven_cases() if cases is None else cases
    jobs: dict[tuple, CompileJob] = {}
    for arch in archs:
        for launch in capture(cases, arch):
            job = specialise(launch, arch)
            if job.key in jobs:
                jobs[job.key].labels.append(launch.label)
            else:
                jobs[job.key] = job
    return list(jobs.values())
