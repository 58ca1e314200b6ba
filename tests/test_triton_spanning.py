"""The batch-spanning forward kernel (kernels/conv_fwd_spanning.py) beyond what the strategy-
parametrised tests of test_triton_forward.py cover: launches split over the batch, int32 / int64
offset limits, strided-channel (NCHW) x addressed by the kernel itself, determinism, and the
config pruning rules.

Runs the compiled kernel on CUDA when a GPU is present, else the Triton interpreter on CPU
(tests/conftest.py). Shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
from helpers import Case, make_inputs
from test_triton_forward import DEVICE, ON_GPU, check_output, run_case

from dynconv.kernels._common import INT32_LIMIT, interpreter_enabled

if not ON_GPU and not interpreter_enabled():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("fp32_dots")


def _packed_bank(bank, groups):
    from dynconv.kernels.mix import mixed_views, pack_bank

    packed, _ = mixed_views(pack_bank(bank, groups), bank.shape, groups, False)
    return packed


def _launch(case: Case, dtype=torch.float32, x_transform=None, **kwargs):
    """y of conv_fwd_spanning called directly (no layout conversion by the backend)."""
    from dynconv.kernels.conv_fwd_spanning import conv_fwd_spanning
    from dynconv.kernels.mix import mixed_views, pack_bank

    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    if x_transform is not None:
        x = x_transform(x)
    packed, _ = mixed_views(pack_bank(bank, case.groups), bank.shape, case.groups, False)
    ho = (x.shape[2] + 2 * case.padding[0] - case.dilation[0] * (case.kernel[0] - 1) - 1) \
        // case.stride[0] + 1
    wo = (x.shape[3] + 2 * case.padding[1] - case.dilation[1] * (case.kernel[1] - 1) - 1) \
        // case.stride[1] + 1
    y = torch.full((case.batch, case.cout, ho, wo), float("nan"), device=DEVICE, dtype=dtype)
    with torch.no_grad():
        conv_fwd_spanning(x, packed, bias, routing, y, case.stride, case.padding,
                          case.dilation, interpreter=not ON_GPU, **kwargs)
    return x, bank, routing, bias, y


@pytest.mark.parametrize("max_samples", [1, 2])
def test_batch_split_over_launches(max_samples):
    """Launches of 1 or 2 samples (5 = 2 + 2 + 1) write every sample once, with each launch's
    rows, routing rows and y rows offset to its first sample."""
    case = Case(batch=5, stride=(2, 1), experts=3, layout="channels_last")
    x, bank, routing, bias, y = _launch(case, max_samples=max_samples)
    check_output(y, x, bank, routing, bias, case, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "strided"])
def test_tap_major_with_strided_channels(layout):
    """C_in/G = 18 (tap-major) on an x whose channels are not contiguous: the backend converts
    such an x to channels_last, the kernel itself addresses any strides."""
    case = Case(cin=18, cout=5, h=5, w=4, experts=2, layout=layout, groups=1)
    x, bank, routing, bias, y = _launch(case)
    assert x.stride(1) != 1
    check_output(y, x, bank, routing, bias, case, torch.float32)


def test_backend_output_keeps_the_input_format():
    """The backend's channels_last copy of a wide NCHW x is internal: y is NCHW."""
    case = Case(cin=18, cout=5, h=5, w=4, experts=2, batch=2)
    x, y = run_case(case, "spanning", torch.float32)
    assert x.is_contiguous() and y.is_contiguous()


def test_deterministic():
    case = Case(cin=18, cout=20, h=6, w=5, experts=4, batch=3, layout="channels_last")
    outputs = [_launch(case, torch.bfloat16)[-1] for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])


def test_int64_offsets_tap_major_only():
    from dynconv.kernels.conv_fwd_spanning import conv_fwd_spanning

    case = Case()
    x, bank, routing, bias = make_inputs(case, torch.float32, DEVICE)
    y = torch.empty(case.batch, case.cout, case.h, case.w, device=DEVICE)
    with pytest.raises(ValueError, match="tap_major"):
        conv_fwd_spanning(x, _packed_bank(bank, 1), bias, routing, y, (1, 1), (1, 1), (1, 1),
                          not ON_GPU, offset_64=True, tap_major=False)


def test_samples_per_launch_keeps_int32_spans():
    from dynconv.kernels.conv_fwd_spanning import samples_per_launch

    meta = dict(device="meta", dtype=torch.bfloat16)
    # 2**26 elements per sample of x, 2**25 per sample of y: x limits a launch to 32 samples.
    x = torch.empty(100, 64, 1024, 1024, **meta)
    y = torch.empty(100, 32, 1024, 1024, **meta)
    n = samples_per_launch(x, y, 1024 * 1024, offset_64=False)
    assert n == 32  # samples 0..31 reach 31 * 2**26 + 2**26 - 1 = 2**31 - 1
    assert (n - 1) * x.stride(0) + x[0].numel() - 1 <= INT32_LIMIT
    assert n * x.stride(0) + x[0].numel() - 1 > INT32_LIMIT
    # One sample past 2**31 elements: int64 offsets, as many samples as keep the launch's
    # rows (samples x HO x WO, an int32 row index) below 2**31.
    huge = torch.empty(3, 4, 2**15, 2**15, **meta)
    assert samples_per_launch(huge, huge, 2**29, offset_64=True) == 3
    assert samples_per_launch(huge, huge, 2**30, offset_64=True) == 1
    small = torch.empty(7, 4, 8, 8, **meta)
    assert samples_per_launch(small, small, 64, offset_64=False) == 7


# --- configs -------------------------------------------------------------------------------------


def _named_args(rows=32 * 49, cin_g=256, cout_g=256, kernel=(3, 3), dtype=torch.bfloat16,
                x_stride_c=1, **constexprs):
    x = torch.empty(1, cin_g, 1, 1, dtype=dtype, device="meta")
    return {"x_ptr": x, "ROWS": rows, "C_IN_G": cin_g, "C_OUT_G": cout_g, "KH": kernel[0],
            "KW": kernel[1], "x_stride_c": x_stride_c, "TAP_MAJOR": cin_g >= 16, **constexprs}


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
            for c in configs}


def test_spanning_interpreter_uses_one_config():
    from dynconv.kernels.configs import conv_fwd_spanning_configs

    assert len(conv_fwd_spanning_configs(interpreter=True)) == 1
    assert len(conv_fwd_spanning_configs(interpreter=False)) > 1


def test_spanning_configs_fit_registers_and_shared_memory():
    from dynconv.kernels.configs import (
        _CONV_FWD_SPANNING_IEEE,
        CONV_FWD_SPANNING_FP32_MAX_ACC_PER_THREAD,
        conv_fwd_shared_bytes,
        conv_fwd_spanning_configs,
        prune_conv_fwd_spanning_configs,
        pruning_for_capability,
    )

    configs = conv_fwd_spanning_configs(interpreter=False)
    for c in configs:  # two fp32 accumulators of at most 64 elements per thread each
        assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
    with pruning_for_capability(90):
        bf16 = prune_conv_fwd_spanning_configs(configs, _named_args())
        fp32 = prune_conv_fwd_spanning_configs(configs, _named_args(dtype=torch.float32))
        nchw = prune_conv_fwd_spanning_configs(configs, _named_args(x_stride_c=49))
    with pruning_for_capability(80):
        ampere = prune_conv_fwd_spanning_configs(configs, _named_args())
    # A wide channels_last bf16 layer on sm_90 keeps every tile of at least 32 columns (but
    # the ones for fp32 with tf32 off).
    assert _tiles(bf16) == {t for t in _tiles(configs) if t[1] >= 32
                            and t not in {e[:4] for e in _CONV_FWD_SPANNING_IEEE}}
    assert max(t[2] for t in _tiles(bf16)) == 64
    # fp32: accumulators of at most 32 elements per thread, BLOCK_K = 32, within shared memory.
    assert fp32 and all(
        c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
        <= CONV_FWD_SPANNING_FP32_MAX_ACC_PER_THREAD * 32 * c.num_warps
        and c.kwargs["BLOCK_K"] == 32 and conv_fwd_shared_bytes(c, 4) <= 232448 for c in fp32)
    # Strided channels and sm_80: no BLOCK_K = 64; sm_80 keeps its measured tiles only.
    assert nchw and max(t[2] for t in _tiles(nchw)) == 32
    assert _tiles(ampere) == {(64, 32, 32, 4), (128, 64, 32, 8)}
    # 4-stage pipelines: 2-byte channels_last on sm_90 only.
    assert max(c.num_stages for c in bf16) == 4
    assert max(c.num_stages for c in fp32 + nchw + ampere) <= 3


def test_spanning_configs_pruned_by_shape():
    from dynconv.kernels.configs import (
        conv_fwd_spanning_configs,
        prune_conv_fwd_spanning_configs,
        pruning_for_capability,
    )

    configs = conv_fwd_spanning_configs(interpreter=False)
    with pruning_for_capability(90):
        # Depthwise-like: 1 output channel, 9-long flattened reduction, 40 rows.
        tiny = prune_conv_fwd_spanning_configs(configs, _named_args(40, 1, 1))
        int64 = prune_conv_fwd_spanning_configs(configs, _named_args(), OFFSET_64=True)
    assert _tiles(tiny) == {(64, 16, 32, 4)}
    assert int64 and all(t[:2] in {(64, 16), (64, 32)} for t in _tiles(int64))


def test_spanning_fp32_ieee_dots_take_their_own_tiles():
    """fp32 with tf32 off keeps only the BLOCK_K = 16, 8-warp tiles (on sm_80 too); 4 warps
    and BLOCK_K = 32 spilled there. tf32 launches never see them."""
    from dynconv.kernels.configs import (
        _CONV_FWD_SPANNING_IEEE,
        conv_fwd_spanning_configs,
        mnk_entry,
        prune_conv_fwd_spanning_configs,
        pruning_for_capability,
    )

    configs = conv_fwd_spanning_configs(interpreter=False)
    ieee_tiles = set(_CONV_FWD_SPANNING_IEEE)
    for capability in (80, 90):
        for args in (_named_args(dtype=torch.float32, x_stride_c=49, DOT_FP32=False),
                     _named_args(90, 3, 2, dtype=torch.float32, x_stride_c=110,
                                 DOT_FP32=False)):
            with pruning_for_capability(capability):
                ieee = prune_conv_fwd_spanning_configs(configs, args, INPUT_PRECISION="ieee")
                tf32 = prune_conv_fwd_spanning_configs(configs, args, INPUT_PRECISION="tf32")
            assert ieee and {mnk_entry(c) for c in ieee} <= ieee_tiles
            assert all(c.kwargs["BLOCK_K"] == 16 and c.num_warps == 8 for c in ieee)
            assert tf32 and not {mnk_entry(c) for c in tf32} & ieee_tiles
    with pruning_for_capability(90):
        bf16 = prune_conv_fwd_spanning_configs(configs, _named_args(), INPUT_PRECISION="ieee")
    assert bf16 and not {mnk_entry(c) for c in bf16} & ieee_tiles
