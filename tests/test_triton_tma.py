"""The TMA premix forward (kernels/conv_fwd_tma.py, strategy ``"premix_tma"``): results against
the float64 per-sample loop, what it refuses, its configs, and what the compile-check captures
and compiles of it.

Runs the compiled kernel on a Hopper GPU when present, else the Triton interpreter on CPU
(tests/conftest.py), which reads tensor descriptors with the same zero fill outside the tensor.
Shapes are tiny; all are channels_last, stride 1, with channel counts multiples of 8.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    Case,
    assert_within_bound,
    env_without_interpreter,
    forward_reduction_length,
    make_inputs,
    reference_forward,
)

from dynconv.backends.triton.forward import triton_forward_impl
from dynconv.kernels._common import interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
HOPPER = ON_GPU and torch.cuda.get_device_capability(DEVICE) >= (9, 0)
needs_kernels = pytest.mark.skipif(
    not HOPPER and not (not ON_GPU and interpreter_enabled()),
    reason="needs a GPU of compute capability 9.0+ or TRITON_INTERPRET=1 (conftest.py)")

SM90_SHARED_MEMORY = 232448


def _case(**fields) -> Case:
    return Case(layout="channels_last", **fields)


# The interpreter's config boxes are 8 x 8 pixels, 16 channels of C_in and of C_out.
CASES = {
    # 7 x 5 output: one partial box; padding 1 reaches coordinate -1.
    "3x3_pad1_odd": (_case(batch=2, cin=8, cout=8, h=7, w=5, experts=3), torch.float16),
    # 9 x 10: four boxes, three partial; C_in = 24 ends in a half chunk; padding 2 (-2).
    "5x5_pad2_cin24_batch1": (_case(batch=1, cin=24, cout=16, h=9, w=10, kernel=(5, 5),
                                    padding=(2, 2), experts=2), torch.bfloat16),
    # Dilation 2; C_out = 24: the second column box is half outside y; no bias.
    "3x3_dil2_nobias": (_case(batch=2, cin=8, cout=24, h=6, w=11, padding=(2, 2),
                              dilation=(2, 2), experts=2, bias=False), torch.bfloat16),
    "1x1_pad0": (_case(batch=2, cin=16, cout=8, h=9, w=9, kernel=(1, 1), padding=(0, 0),
                       experts=4), torch.float16),
    # No padding: 8 x 10 output of a 10 x 12 image; unequal padding per axis elsewhere.
    "3x3_pad0": (_case(batch=1, cin=8, cout=16, h=10, w=12, padding=(0, 0), experts=1),
                 torch.bfloat16),
    "3x5_pad_1x2_fp16": (_case(batch=1, cin=40, cout=8, h=5, w=6, kernel=(3, 5),
                               padding=(1, 2), experts=2), torch.float16),
}


def _check(case: Case, dtype, y, x, bank, routing, bias):
    y_ref, scale = reference_forward(x, bank, routing, bias, **case.geometry)
    assert_within_bound(y, y_ref, scale, dtype, forward_reduction_length(case), name="y")


@needs_kernels
@pytest.mark.parametrize("name", list(CASES))
def test_premix_tma_matches_reference(name):
    case, dtype = CASES[name]
    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    with torch.no_grad():
        y = triton_forward_impl(x, bank, routing, bias, case.stride, case.padding,
                                case.dilation, case.groups, strategy="premix_tma")
    _check(case, dtype, y, x, bank, routing, bias)
    assert y.is_contiguous(memory_format=torch.channels_last)


@needs_kernels
def test_premix_tma_mixes_in_chunks():
    """A mixed-weight buffer of two samples' rows: three chunks (2 + 2 + 1), each launch
    reading its rows from row 0 of the buffer and writing its own samples of y."""
    from dynconv.kernels.mix import mixed_layout

    case, dtype = _case(batch=5, cin=8, cout=8, h=4, w=3, experts=2), torch.bfloat16
    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    row_bytes = mixed_layout(bank.shape, True).row_stride * x.element_size()
    with torch.no_grad():
        y = triton_forward_impl(x, bank, routing, bias, case.stride, case.padding,
                                case.dilation, case.groups, strategy="premix_tma",
                                premix_buffer_bytes=2 * row_bytes)
    _check(case, dtype, y, x, bank, routing, bias)


# --- what it refuses ------------------------------------------------------------------------------

ELIGIBLE = _case(batch=1, cin=8, cout=8, h=4, w=4, experts=2)


@pytest.mark.parametrize("change, dtype, argument", [
    ({}, torch.float32, "x: the TMA forward takes bf16 or fp16"),
    ({"groups": 2}, torch.bfloat16, "groups"),
    ({"stride": (2, 2)}, torch.bfloat16, "stride"),
    ({"cin": 12}, torch.bfloat16, "C_in=12"),
    ({"cout": 12}, torch.bfloat16, "C_out=12"),
    ({"layout": "nchw"}, torch.bfloat16, "x: .*channels_last"),
], ids=["fp32", "groups", "stride", "cin", "cout", "nchw"])
def test_strategy_refuses_what_tma_cannot_address(change, dtype, argument):
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma_supported

    case = ELIGIBLE.replace(**change)
    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    interpreter = not ON_GPU
    assert not conv_fwd_tma_supported(x, bank.shape, case.stride, case.groups, interpreter)
    with pytest.raises(ValueError, match=f"premix_tma.*{argument}"):
        triton_forward_impl(x, bank, routing, bias, case.stride, case.padding, case.dilation,
                            case.groups, strategy="premix_tma")


def test_supported_needs_hopper_or_the_interpreter():
    from dynconv.kernels.configs import pruning_for_capability
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma_supported

    x = torch.empty(2, 64, 8, 8, dtype=torch.bfloat16, device="meta")
    x = x.to(memory_format=torch.channels_last)
    shape = (4, 64, 64, 3, 3)
    assert conv_fwd_tma_supported(x, shape, (1, 1), 1)
    with pruning_for_capability(90):
        assert conv_fwd_tma_supported(x, shape, (1, 1), 1)
    with pruning_for_capability(80):
        assert not conv_fwd_tma_supported(x, shape, (1, 1), 1)
    cpu = torch.empty(2, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert not conv_fwd_tma_supported(cpu, shape, (1, 1), 1, interpreter=False)
    assert conv_fwd_tma_supported(cpu, shape, (1, 1), 1, interpreter=True)


def test_launcher_names_a_y_or_weights_it_cannot_use():
    from dynconv.kernels.conv_fwd_tma import conv_fwd_tma
    from dynconv.kernels.mix import mixed_layout, mixed_views

    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 16, 6, 6, **meta).to(memory_format=torch.channels_last)
    bank_shape = (3, 32, 16, 3, 3)
    buffer = torch.empty(2, mixed_layout(bank_shape, True).row_stride, **meta)
    weights, bias = mixed_views(buffer, bank_shape, 1, True)
    nchw_y = torch.empty(2, 32, 6, 6, **meta)
    with pytest.raises(ValueError, match="y: .*channels_last"):
        conv_fwd_tma(x, weights, bias, nchw_y, 0, 2, (1, 1), (1, 1))
    y = nchw_y.to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="weights: .*mixed_views"):
        conv_fwd_tma(x, weights.transpose(2, 3), bias, y, 0, 2, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="weights: 2 rows for batch_count=3"):
        conv_fwd_tma(x, weights, bias, y, 0, 3, (1, 1), (1, 1))


# --- configs --------------------------------------------------------------------------------------


def _named_args(c_in=256, c_out=256, ho=14, wo=14):
    bias = torch.empty(1, c_out, dtype=torch.bfloat16, device="meta")
    return {"bias_ptr": bias, "C_IN": c_in, "C_OUT": c_out, "HO": ho, "WO": wo}


def _boxes(configs):
    return {(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
            for c in configs}


def test_configs_fit_sm90_and_set_the_descriptor_boxes():
    from dynconv.kernels.configs import (
        conv_fwd_tma_configs,
        conv_fwd_tma_shared_bytes,
        prune_conv_fwd_tma_configs,
        pruning_for_capability,
    )

    assert len(conv_fwd_tma_configs(interpreter=True)) == 1
    configs = conv_fwd_tma_configs(interpreter=False)
    for c in configs:  # wgmma's M side is BLOCK_N; the box flattens with its swizzle
        assert c.kwargs["BLOCK_N"] % 64 == 0 and c.kwargs["BLOCK_W"] in (8, 16)
        assert conv_fwd_tma_shared_bytes(c, 2) <= SM90_SHARED_MEMORY
    pixels_by_channels = {(c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"], c.kwargs["BLOCK_N"])
                          for c in configs}
    assert {(128, 128), (128, 256)} <= pixels_by_channels
    with pruning_for_capability(90):
        wide = prune_conv_fwd_tma_configs(configs, _named_args())
        small_image = prune_conv_fwd_tma_configs(configs, _named_args(512, 512, 7, 7))
        narrow = prune_conv_fwd_tma_configs(configs, _named_args(8, 8, 56, 56))
    assert _boxes(wide) == _boxes(configs)
    assert {box[:2] for box in _boxes(small_image)} == {(8, 8)}
    assert {box[2:] for box in _boxes(narrow)} == {(64, 32)}

    config = configs[-1]
    descriptors = {name: type("Descriptor", (), {})() for name in ("x_desc", "w_desc", "y_desc")}
    config.pre_hook({**descriptors, **config.all_kwargs()})
    h, w, n, k = (config.kwargs[f"BLOCK_{d}"] for d in "HWNK")
    assert descriptors["x_desc"].block_shape == [1, h, w, k]
    assert descriptors["w_desc"].block_shape == [1, 1, k, n]
    assert descriptors["y_desc"].block_shape == [1, h, w, n]


# --- the compile-check's capture and a real compile ----------------------------------------------

CAPTURE_AND_COMPILE = textwrap.dedent("""
    import json
    import triton
    from dynconv.autotune.compile_check import compile_job, row_values
    from dynconv.autotune.launch_capture import DrivenCase, jobs_for
    from dynconv.autotune.shapes import get_shape_set
    from dynconv.kernels.configs import conv_fwd_tma_shared_bytes
    layer = next(s for s in get_shape_set("resnet18") if s.name == "layer4.0.conv2")
    case = DrivenCase(layer, 32, 4, "bf16", True)
    jobs = [j for j in jobs_for([80, 90], [case]) if j.kernel == "conv_fwd_tma_kernel"]
    largest = max(jobs, key=lambda j: j.options["num_stages"] * int(j.config.split()[2][1:]))
    row = row_values(compile_job(largest))
    blocks = dict(zip("HWNK", (int(part[1:]) for part in largest.config.split()[:4])))
    config = triton.Config({f"BLOCK_{d}": v for d, v in blocks.items()},
                           num_stages=largest.options["num_stages"])
    row["estimate"] = conv_fwd_tma_shared_bytes(config, 2)
    print(json.dumps({"jobs": [dict(arch=j.arch, config=j.config, signature=j.signature,
                                    labels=j.labels) for j in jobs], "row": row}))
""")


def test_capture_and_compile_for_sm90_only():
    """sm_80 drives no TMA launch; on sm_90 each config's descriptors carry its own boxes
    through Triton's binder, and the widest compiles to wgmma on two TMA loads per main-loop
    step without waiting for its own wgmma, with no spills and no more shared memory than the
    pruning estimates."""
    run = subprocess.run([sys.executable, "-c", CAPTURE_AND_COMPILE], capture_output=True,
                         text=True, env=env_without_interpreter(), timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    jobs = result["jobs"]
    assert jobs and {j["arch"] for j in jobs} == {90}
    for job in jobs:
        assert all(label.endswith("fwd-premix_tma") for label in job["labels"])
        h, w, n, k = (int(part[1:]) for part in job["config"].split()[:4])
        assert job["signature"]["x_desc"] == f"tensordesc<bf16[1, {h}, {w}, {k}]>"
        assert job["signature"]["w_desc"] == f"tensordesc<bf16[1, 1, {k}, {n}]>"
        assert job["signature"]["y_desc"] == f"tensordesc<bf16[1, {h}, {w}, {n}]>"
    row = result["row"]
    assert row["status"] == "ok" and row["spill_bytes"] == 0
    assert row["tensor_core"] == "wgmma"
    assert row["loop_async_loads"] == 2 and row["loop_plain_loads"] == 0
    assert row["loop_waits_for_mma"] is False
    assert 0 < row["shared_bytes"] <= row["estimate"]


@needs_kernels
def test_a_config_without_its_pre_hook_still_sets_the_boxes():
    """Tuned-table entries come back from JSON without the pre_hook that sets the descriptors'
    block shapes; the launcher's tuned kernel puts it back (here through a forced config)."""
    import triton

    from dynconv.kernels import tuned_table
    from dynconv.kernels.configs import conv_fwd_tma_configs

    (config,) = conv_fwd_tma_configs(interpreter=not ON_GPU)[:1]
    bare = triton.Config(config.kwargs, num_warps=config.num_warps,
                         num_stages=config.num_stages)
    case, dtype = _case(batch=1, cin=8, cout=8, h=5, w=4, experts=2), torch.float16
    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    with tuned_table.forcing("conv_fwd_tma", bare), torch.no_grad():
        y = triton_forward_impl(x, bank, routing, bias, case.stride, case.padding,
                                case.dilation, case.groups, strategy="premix_tma")
    _check(case, dtype, y, x, bank, routing, bias)
