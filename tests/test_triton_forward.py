"""The Triton forward (mix + conv kernels: premix, fused and batch-spanning) against a float64
per-sample loop.

Runs the compiled kernels on CUDA when a GPU is present, else the Triton interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). Shapes are tiny: the
interpreter costs about a millisecond per operation per program.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    Case,
    assert_within_bound,
    forward_reduction_length,
    make_inputs,
    reference_forward,
)

import dynconv
from dynconv.backends.triton.forward import (
    choose_strategy,
    premix_chunk_size,
    triton_forward_impl,
)
from dynconv.kernels._common import interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
if not ON_GPU and not interpreter_enabled():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)", allow_module_level=True)

# fp32 dots in ieee unless a test asks for tf32 (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fp32_dots")

STRATEGIES = ("premix", "fused", "spanning")


CASES = {
    "base_3x3": Case(),
    "kernel_1x1": Case(kernel=(1, 1), padding=(0, 0)),
    "kernel_5x5": Case(kernel=(5, 5), padding=(2, 2), cin=3),
    "kernel_1x3": Case(kernel=(1, 3), padding=(0, 1)),
    "stride_2": Case(stride=(2, 2)),
    "stride_2x1_pad_0": Case(stride=(2, 1), padding=(0, 0)),
    "dilation_2": Case(dilation=(2, 2), padding=(2, 2)),
    "dilation_2x1": Case(dilation=(2, 1), padding=(0, 1)),
    "groups_2": Case(groups=2, cout=6),
    "depthwise": Case(groups=6, cout=6),
    "depthwise_multiplier_2": Case(groups=3, cin=3, cout=6),
    "odd_hw": Case(h=5, w=3, cin=5, cout=7),
    "batch_1": Case(batch=1),
    "experts_1": Case(experts=1),
    "no_bias": Case(bias=False),
    "channels_last": Case(layout="channels_last"),
    "channels_last_groups_2": Case(layout="channels_last", groups=2, stride=(2, 2)),
    "strided_input": Case(layout="strided"),
    # Several row tiles (72 pixels) and column tiles (18 channels) per sample.
    "multi_tile": Case(h=9, w=8, cin=4, cout=18),
    "groups_2_multi_n_tile": Case(groups=2, cin=4, cout=36, h=4, w=4, experts=2),
    # Past configs.MAX_EXPERT_CHUNK experts fused takes several passes: 5 + 4 and 6 + 6 + 5.
    "experts_9": Case(experts=9, batch=2),
    "experts_17": Case(experts=17, batch=2, layout="channels_last", groups=2),
}


def check_output(y, x, bank, routing, bias, case: Case, dtype: torch.dtype, tf32=False):
    """y against the float64 loop on the same inputs, within the rounding bound of ``dtype``
    (tests/helpers.py: relative to sum |x| |W| of each output, over the case's reduction)."""
    y_ref, scale = reference_forward(x, bank, routing, bias, **case.geometry)
    assert_within_bound(y, y_ref, scale, dtype, forward_reduction_length(case), tf32=tf32,
                        name="y")
    return y_ref


def run_case(case: Case, strategy: str, dtype: torch.dtype, tf32: bool = False, **kwargs):
    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    with torch.no_grad():
        y = triton_forward_impl(x, bank, routing, bias, case.stride, case.padding,
                                case.dilation, case.groups, strategy=strategy, **kwargs)
    check_output(y, x, bank, routing, bias, case, dtype, tf32)
    return x, y


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_fp32(name, strategy):
    case = CASES[name]
    x, y = run_case(case, strategy, torch.float32)
    expected = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


TAP_MAJOR_CASES = ["base_3x3", "stride_2", "dilation_2", "groups_2", "depthwise", "odd_hw",
                   "no_bias", "channels_last", "strided_input", "multi_tile", "experts_17"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", TAP_MAJOR_CASES)
def test_forward_fp32_tap_major(name, strategy, monkeypatch):
    """The tap-major reduction (used from C_in/G >= 16) forced on small channel counts."""
    # Both forward kernels take their default from _common.resolve_tap_major.
    monkeypatch.setattr("dynconv.kernels._common.MIN_DOT_BLOCK", 1)
    run_case(CASES[name], strategy, torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_wide_channels(strategy, dtype):
    """C_in/G = 18 >= 16 selects tap-major by itself, with a partial channel chunk."""
    run_case(Case(cin=18, cout=5, h=5, w=4, experts=2), strategy, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_wide_channels_several_chunks(strategy):
    """C_in/G = 70: more than one BLOCK_K channel chunk per tap, the last one partial."""
    run_case(Case(cin=70, cout=3, h=5, w=3, kernel=(1, 3), padding=(0, 1), stride=(2, 1),
                  experts=2, layout="channels_last"), strategy, torch.float32)


LOW_PRECISION_CASES = ["base_3x3", "stride_2", "depthwise", "channels_last", "experts_1",
                       "experts_17"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_low_precision(name, strategy, dtype):
    run_case(CASES[name], strategy, dtype)


@pytest.mark.parametrize("fp32_dots", [True, False], ids=["tf32", "ieee"], indirect=True)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_fp32_tf32_setting(fp32_dots, strategy):
    """fp32 follows torch.backends.cudnn.allow_tf32; ieee must meet the fp32 tolerance."""
    run_case(Case(cin=8, cout=5), strategy, torch.float32, tf32=fp32_dots)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_bank_routing_and_bias(strategy):
    """Parameters are read through their strides too (views of larger or permuted tensors)."""
    case = Case(groups=2)
    x, bank, routing, bias = make_inputs(case, torch.float32, DEVICE)
    bank = bank.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    routing = routing.t().contiguous().t()
    bias = torch.cat([bias, bias], dim=1)[:, ::2]
    assert not (bank.is_contiguous() or routing.is_contiguous() or bias.is_contiguous())
    with torch.no_grad():
        y = triton_forward_impl(x, bank, routing, bias, case.stride, case.padding,
                                case.dilation, case.groups, strategy=strategy)
    check_output(y, x, bank, routing, bias, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_premix_batch_larger_than_chunk(dtype):
    case = Case(batch=5)
    x, bank, routing, bias = make_inputs(case, dtype, DEVICE)
    row_bytes = (case.cout * case.cin * 9 + case.cout) * x.element_size()
    # A budget of two samples' rows (rounded-up row length included) gives chunks of 2, 2, 1.
    budget = 2 * (row_bytes + 32 * x.element_size())
    assert premix_chunk_size(case.batch, row_bytes // x.element_size() + 32, x.element_size(),
                             budget) == 2
    run_case(case, "premix", dtype, premix_buffer_bytes=budget)


def test_premix_chunks_fill_a_wave():
    from dynconv.backends.triton.forward import ASSUMED_SM_COUNT, samples_per_wave

    meta = torch.device("meta")
    # 512 -> 512 at 7x7: 4 programs per sample at 128 x 128 tiles, 33 samples fill 132 SMs.
    assert samples_per_wave(meta, 1, 512, 49) == -(-ASSUMED_SM_COUNT // 4) == 33
    assert samples_per_wave(meta, 1, 64, 56 * 56) == 6  # 25 tiles per sample
    row = 512 * 512 * 9  # bf16: 4.5 MiB per sample, 14 fit 64 MiB
    assert premix_chunk_size(32, row, 2) == 14
    assert premix_chunk_size(32, row, 2, min_samples=33) == 32  # the wave, capped by the batch
    assert premix_chunk_size(64, row, 2, min_samples=33) == 33


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch(strategy):
    x, bank, routing, bias = make_inputs(Case(batch=1), torch.float32, DEVICE)
    y = triton_forward_impl(x[:0], bank, routing[:0], bias, (2, 2), (1, 1), (1, 1), 1,
                            strategy=strategy)
    assert y.shape == (0, 4, 4, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_same_through_dispatcher(strategy, monkeypatch):
    """padding="same" with an even kernel: the dispatcher pads the extra row/column first."""
    case = Case(kernel=(2, 3), padding=(0, 0))
    x, bank, routing, bias = make_inputs(case, torch.float32, DEVICE)
    monkeypatch.setattr("dynconv.backends.triton.forward.choose_strategy", lambda *args: strategy)
    with torch.no_grad():
        y = dynconv.dynamic_conv2d(x, bank, routing, bias, padding="same", backend="triton")
        y_loop = dynconv.dynamic_conv2d(x, bank, routing, bias, padding="same", backend="loop")
    assert y.shape == x.shape[:1] + (case.cout,) + x.shape[2:]
    torch.testing.assert_close(y, y_loop, rtol=1e-5, atol=1e-5)  # both fp32 ieee


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int64_offsets_path(strategy):
    """The OFFSET_64 variant (used when a sample spans > 2**31 elements) computes the same."""
    from dynconv.kernels.conv_fwd import conv_fwd
    from dynconv.kernels.conv_fwd_spanning import conv_fwd_spanning
    from dynconv.kernels.mix import mix, mixed_views

    case = Case(stride=(2, 1), layout="channels_last")
    x, bank, routing, bias = make_inputs(case, torch.float32, DEVICE)
    y_ref, _ = reference_forward(x, bank, routing, bias, **case.geometry)
    y = torch.empty(y_ref.shape, device=DEVICE, dtype=x.dtype)
    interpreter = not ON_GPU
    with torch.no_grad():
        if strategy == "spanning":
            conv_fwd_spanning(x, bank.unflatten(1, (1, case.cout)), bias, routing, y,
                              case.stride, case.padding, case.dilation, interpreter,
                              offset_64=True)
        elif strategy == "fused":
            conv_fwd(x, bank.unflatten(1, (1, case.cout)), bias, routing, y, 0, case.batch,
                     case.stride, case.padding, case.dilation, interpreter, offset_64=True)
        else:
            buffer = mix(routing, bank, bias, case.groups, interpreter=interpreter)
            weights, mixed_bias = mixed_views(buffer, bank.shape, case.groups, True)
            conv_fwd(x, weights, mixed_bias, None, y, 0, case.batch, case.stride,
                     case.padding, case.dilation, interpreter, offset_64=True)
    check_output(y, x, bank, routing, bias, case, torch.float32)


# --- mix kernel alone ----------------------------------------------------------------------------


def _mixed_rows_reference(routing, bank, bias, groups):
    """The whole mixed rows (padding included, zeros) in float64 from pack_bank's order."""
    from dynconv.kernels.mix import mixed_layout, pack_bank

    a = routing.double().cpu()
    layout = mixed_layout(bank.shape, bias is not None)
    packed = pack_bank(bank.double().cpu(), groups)
    rows = a.new_zeros(a.shape[0], layout.row_stride)
    scale = torch.zeros_like(rows)
    rows[:, : packed.shape[1]] = a @ packed
    scale[:, : packed.shape[1]] = a.abs() @ packed.abs()
    if bias is not None:
        end = layout.bias_offset + layout.n_bias
        rows[:, layout.bias_offset : end] = a @ bias.double().cpu()
        scale[:, layout.bias_offset : end] = a.abs() @ bias.double().cpu().abs()
    return rows, scale


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("experts", [1, 4, 5, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_mix_kernel(experts, dtype, bias):
    """The packed bank mixed for groups > 1 (C_out/G = 2, a 3x1 kernel: 36 weights, so the row
    has padding before the bias and after it), one chunk of 16 experts or several, the last
    masked; the whole row, padding included (zeros), against float64."""
    from dynconv.kernels.mix import mix, mixed_layout, mixed_views, pack_bank

    g = torch.Generator().manual_seed(experts)
    batch, cout, cin_g, groups = 3, 6, 2, 3
    bank = torch.randn(experts, cout, cin_g, 3, 1, generator=g).to(DEVICE, dtype)
    bias_bank = torch.randn(experts, cout, generator=g).to(DEVICE, dtype) if bias else None
    routing = torch.randn(batch, experts, generator=g).to(DEVICE, dtype)
    packed = pack_bank(bank, groups)
    buffer = mix(routing, packed, bias_bank, groups, interpreter=not ON_GPU)
    layout = mixed_layout(bank.shape, bias)
    assert buffer.shape == (batch, layout.row_stride) and buffer.dtype == dtype
    rows, scale = _mixed_rows_reference(routing, bank, bias_bank, groups)
    # A sum of K products accumulated in fp32 (fp32: K * 2**-24), rounded once to fp16 / bf16
    # (2 roundings of margin).
    assert_within_bound(buffer, rows, scale, dtype, experts, roundings=2, atol=1e-7,
                        name="mixed rows")
    # Read back through the views: the per-sample weights in the bank's logical order.
    weights, mixed_bias = mixed_views(buffer, bank.shape, groups, bias)
    a = routing.double().cpu()
    w_ref = (a @ bank.double().cpu().view(experts, -1)).view(batch, groups, cout // groups,
                                                               cin_g, 3, 1)
    w_scale = (a.abs() @ bank.double().cpu().abs().view(experts, -1)).view(w_ref.shape)
    assert_within_bound(weights, w_ref, w_scale, dtype, experts, roundings=2, atol=1e-7,
                        name="mixed weights")
    assert (mixed_bias is None) == (not bias)


def test_pack_bank_order_and_zero_padding():
    """pack_bank: (K, row_stride), the mixed rows' order (read back by mixed_views), zeros in
    the padding; from a non-contiguous bank too."""
    from dynconv.kernels.mix import mixed_layout, mixed_views, pack_bank

    g = torch.Generator().manual_seed(3)
    bank = torch.randn(2, 6, 5, 3, 1, generator=g).permute(0, 2, 1, 4, 3)  # (2, 5, 6, 1, 3)
    bank = bank[:, :4]  # (2, 4, 6, 1, 3): 72 weights, row of 80
    assert not bank.is_contiguous()
    packed = pack_bank(bank, 2)
    layout = mixed_layout(bank.shape, False)
    assert packed.shape == (2, layout.row_stride) == (2, 80) and packed.is_contiguous()
    assert (packed[:, layout.n_weight :] == 0).all()
    weights, _ = mixed_views(packed, bank.shape, 2, False)
    torch.testing.assert_close(weights, bank.unflatten(1, (2, 2)), rtol=0, atol=0)


@pytest.mark.parametrize("experts", [4, 17])
def test_mix_kernel_non_contiguous_bank_and_chunk_buffer(experts):
    """A non-contiguous bank (and bias bank) packed once; the packed bank and the bank itself
    (packed inside mix) give the same rows; ``out`` rows beyond n untouched."""
    from dynconv.kernels.mix import mix, mixed_layout, mixed_views, pack_bank

    g = torch.Generator().manual_seed(experts)
    bank = torch.randn(experts, 3, 5, 3, 2, generator=g).permute(0, 2, 1, 4, 3).to(DEVICE)
    bias = torch.randn(5, experts, generator=g).to(DEVICE).t()  # (K, 5), column stride K
    routing = torch.randn(2, experts, generator=g).to(DEVICE)
    assert not (bank.is_contiguous() or bias.is_contiguous())
    layout = mixed_layout(bank.shape, True)
    out = torch.full((3, layout.row_stride), 7.0, device=DEVICE)
    mix(routing, pack_bank(bank, 1), bias, 1, out=out, interpreter=not ON_GPU)
    weights, mixed_bias = mixed_views(out[:2], bank.shape, 1, True)
    expected = (routing.double() @ bank.double().reshape(experts, -1)).view(2, 1, *bank.shape[1:])
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed_bias.double(), routing.double() @ bias.double(),
                               rtol=1e-6, atol=1e-6)
    assert (out[2] == 7.0).all()
    unpacked = mix(routing, bank, bias, 1, interpreter=not ON_GPU)
    torch.testing.assert_close(unpacked, out[:2], rtol=0, atol=0)


def test_mix_rejects_a_bank_it_cannot_read_with_unit_stride():
    from dynconv.kernels.mix import mix, pack_bank

    bank = torch.randn(2, 4, 3, 3, 3)
    routing = torch.randn(1, 2)
    with pytest.raises(ValueError, match="weight_bank"):
        mix(routing, torch.randn(2, 20), None, 1, interpreter=True)  # not a multiple of 16
    with pytest.raises(ValueError, match="weight_bank"):
        mix(routing, pack_bank(bank, 1)[:, ::2], None, 1, interpreter=True)  # strided columns


def test_premix_packs_the_bank_once_per_call(monkeypatch):
    """Premix packs the bank once per forward call and mixes every chunk from the packed bank."""
    import dynconv.kernels.mix as mix_module

    packs, banks = [], []
    pack_bank, mix = mix_module.pack_bank, mix_module.mix

    def counting_pack(*args, **kwargs):
        packs.append(1)
        return pack_bank(*args, **kwargs)

    def recording_mix(routing, weight_bank, *args, **kwargs):
        banks.append(weight_bank.dim())
        return mix(routing, weight_bank, *args, **kwargs)

    monkeypatch.setattr(mix_module, "pack_bank", counting_pack)
    monkeypatch.setattr(mix_module, "mix", recording_mix)
    case = Case(batch=5, experts=4, groups=2, cout=6, layout="channels_last")
    element_size = torch.tensor([], dtype=torch.bfloat16).element_size()
    row_bytes = (case.cout * (case.cin // case.groups) * 9 + 16 + 16) * element_size
    run_case(case, "premix", torch.bfloat16, premix_buffer_bytes=2 * row_bytes)
    assert len(packs) == 1 and banks == [2, 2, 2]  # chunks of 2, 2, 1: each from the packed bank


# --- module, dispatch and errors ----------------------------------------------------------------


def test_dynamic_cnn_forward_matches_loop():
    torch.manual_seed(0)
    net = dynconv.DynamicCNN(in_channels=3, num_classes=5, num_experts=3, widths=(8, 12, 16),
                             stem_channels=8, backend="loop").to(DEVICE).eval()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with torch.no_grad():
        logits_loop, routings_loop = net(x, return_routing=True)
        for module in net.modules():
            if isinstance(module, dynconv.DynamicConv2d):
                module.backend = "triton"
        logits, routings = net(x, return_routing=True)
    for a, a_loop in zip(routings, routings_loop, strict=True):
        torch.testing.assert_close(a, a_loop)
    torch.testing.assert_close(logits, logits_loop, rtol=1e-4, atol=1e-5)  # fp32 ieee


def test_unknown_strategy():
    x, bank, routing, bias = make_inputs(Case(), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="strategy"):
        triton_forward_impl(x, bank, routing, bias, (1, 1), (1, 1), (1, 1), 1, strategy="both")


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, bank, routing, bias = make_inputs(Case(), torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dynconv.dynamic_conv2d(x, bank, routing, bias, padding=1, backend="triton")


def test_choose_strategy_follows_the_roofline_model():
    """auto picks the strategy with the lowest bound of the roofline model (the one ``python -m
    dynconv.autotune roofline`` tabulates), fused only up to MAX_EXPERT_CHUNK experts."""
    from dynconv.backends.triton.roofline_model import strategy_bounds

    def pick(batch, cin, cout, size, experts, kernel=3, stride=1, groups=1,
             dtype=torch.bfloat16):
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        return choose_strategy((batch, cin, size, size),
                               (experts, cout, cin // groups, kernel, kernel), (out, out),
                               groups, dtype)

    # Early layer: 56x56 outputs fill per-sample tiles; K x the FLOPs would cost spanning,
    # re-mixing the bank in 49 row tiles per sample would cost fused.
    assert pick(32, 64, 64, 56, 4) == "premix"
    # Late layer at 7x7: one row tile per sample, the bank from L2: fused.
    assert pick(32, 512, 512, 7, 4) == "fused"
    # Past MAX_EXPERT_CHUNK experts fused is never chosen.
    assert pick(32, 512, 512, 7, 9) != "fused"
    # A memory-bound 1x1 on small images with a bank larger than the batch's samples: writing
    # B x |W| costs premix, per-sample tiles cost fused; one batch-spanning GEMM wins.
    assert pick(32, 64, 128, 56, 4, kernel=1, stride=2) == "spanning"
    # The rule is the model's argmin, whatever it picks.
    for batch, cin, cout, size, experts in [(8, 64, 64, 8, 4), (2, 256, 256, 14, 2),
                                            (64, 32, 96, 28, 8), (4, 16, 16, 4, 3)]:
        bounds = strategy_bounds(batch, experts, cin, cout, size, size, size, size, 3, 3, 1,
                                 "bf16")
        best = min(("premix", "fused", "spanning"), key=bounds.time)
        assert pick(batch, cin, cout, size, experts) == best


def test_choose_strategy_depthwise_counts_the_padded_columns():
    """Depthwise (one output channel per group) fills 1 of 16 tile columns: K x those wasted
    FLOPs keep spanning off a compute-bound depthwise layer."""
    from dynconv.backends.triton.roofline_model import h200, tilings

    assert tilings(64, 1, 1, 32, h200().sms)[0].n_eff == 1 / 16
    assert tilings(64, 1, 96, 1, h200().sms)[0].n_eff == 96 / 128
    assert choose_strategy((32, 144, 56, 56), (4, 144, 1, 3, 3), (56, 56), 144,
                           torch.bfloat16) != "spanning"


def test_choose_strategy_dtype_and_signature():
    """dtype selects the model's peak and bytes (None: bf16); the rule takes positional
    arguments only (tools replace it by ``lambda *args: name``)."""
    shape = ((32, 64, 28, 28), (4, 128, 64, 1, 1), (14, 14), 1)
    assert choose_strategy(*shape) == choose_strategy(*shape, torch.bfloat16)
    assert choose_strategy(*shape, torch.float32) in ("premix", "fused", "spanning")


# --- configs -------------------------------------------------------------------------------------


def _conv_named_args(ho_wo=(7, 5), cin_g=6, cout_g=4, kernel=(3, 3)):
    x = torch.empty(1, cin_g, 1, 1)
    return {"x_ptr": x, "HO": ho_wo[0], "WO": ho_wo[1], "C_IN_G": cin_g, "C_OUT_G": cout_g,
            "KH": kernel[0], "KW": kernel[1]}


def test_interpreter_uses_one_config():
    from dynconv.kernels.configs import conv_fwd_configs, mix_configs

    assert len(conv_fwd_configs(interpreter=True)) == 1
    assert len(mix_configs(interpreter=True)) == 1
    assert len(conv_fwd_configs(interpreter=False)) > 1


def test_conv_configs_pruned_by_shape():
    from dynconv.kernels.configs import (
        _CONV_FWD_IEEE,
        conv_fwd_configs,
        mnk_entry,
        prune_conv_fwd_configs,
        sm90_only_config,
    )

    configs = conv_fwd_configs(interpreter=False)
    for c in configs:  # tl.dot operands >= 16 on a GPU
        assert min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_M"]) >= 16
    small = prune_conv_fwd_configs(configs, _conv_named_args())
    smallest_m = min(c.kwargs["BLOCK_M"] for c in configs)
    smallest_n = min(c.kwargs["BLOCK_N"] for c in configs)
    # 35 output pixels -> BLOCK_M <= 64; 4 output channels -> the smallest BLOCK_N only.
    assert small and all(c.kwargs["BLOCK_M"] <= max(64, smallest_m) for c in small)
    assert all(c.kwargs["BLOCK_N"] == smallest_n for c in small)
    large = prune_conv_fwd_configs(configs, _conv_named_args((56, 56), 64, 128))
    # Not BLOCK_K = 64, 256-wide or 4 stages (fp32, unknown device), nor the ieee tiles.
    assert len(large) == sum(not sm90_only_config(c) and mnk_entry(c) not in _CONV_FWD_IEEE
                             for c in configs)


def test_conv_configs_with_wide_reduction_steps_only_for_premix_on_sm90():
    """BLOCK_K = 64, 256-wide tiles and 4-stage pipelines are kept for a 2-byte channels_last x
    (premix, tap-major) on sm_90 only."""
    from dynconv.kernels.configs import (
        conv_fwd_configs,
        conv_fwd_shared_bytes,
        prune_conv_fwd_configs,
        pruning_for_capability,
        sm90_only_config,
    )

    configs = conv_fwd_configs(interpreter=False)
    bf16_cl = {**_conv_named_args((14, 14), 256, 256),
               "x_ptr": torch.empty(1, dtype=torch.bfloat16), "x_stride_c": 1,
               "TAP_MAJOR": True, "FUSED": False}

    def wide(named_args, capability):
        with pruning_for_capability(capability):
            kept = prune_conv_fwd_configs(configs, named_args)
        assert kept
        return {name for c in kept for name, on in (("K64", c.kwargs["BLOCK_K"] == 64),
                                                   ("N256", c.kwargs["BLOCK_N"] == 256),
                                                   ("4 stages", c.num_stages == 4)) if on}

    assert wide(bf16_cl, 90) == {"K64", "N256", "4 stages"}
    assert all(conv_fwd_shared_bytes(c, 2) <= 232448 for c in configs if sm90_only_config(c))
    assert not wide(bf16_cl, 80)
    assert not wide({**bf16_cl, "x_stride_c": 3136}, 90)  # NCHW
    assert not wide({**bf16_cl, "FUSED": True, "NUM_EXPERTS": 4, "EXPERT_CHUNK": 4}, 90)
    assert not wide({**bf16_cl, "x_ptr": torch.empty(1)}, 90)  # fp32
    assert not wide({**bf16_cl, "TAP_MAJOR": False}, 90)


def test_expert_chunks():
    """Fused kernels mix at most MAX_EXPERT_CHUNK experts per pass, spread evenly."""
    from dynconv.kernels.configs import MAX_EXPERT_CHUNK, expert_chunk

    assert MAX_EXPERT_CHUNK == 8
    assert [expert_chunk(k) for k in (1, 4, 8, 9, 16, 17, 64)] == [1, 4, 8, 5, 8, 6, 8]


def test_auto_strategy_never_fuses_several_expert_passes():
    from dynconv.backends.triton import forward
    from dynconv.kernels.configs import MAX_EXPERT_CHUNK

    assert forward.MAX_EXPERT_CHUNK == MAX_EXPERT_CHUNK  # the Triton-free copy agrees
    # The model alone would fuse 9 experts here too.
    from dynconv.backends.triton.roofline_model import best_strategy, strategy_bounds

    x_shape = (8, 256, 7, 7)
    assert best_strategy(strategy_bounds(8, 9, 256, 256, 7, 7, 7, 7, 3, 3)) == "fused"
    assert forward.choose_strategy(x_shape, (8, 256, 256, 3, 3), (7, 7)) == "fused"
    assert forward.choose_strategy(x_shape, (9, 256, 256, 3, 3), (7, 7)) == "premix"


def test_fused_configs_with_several_expert_passes_keep_small_tiles():
    from dynconv.kernels.configs import (
        CONV_FWD_MULTI_PASS_MAX_TILE,
        conv_fwd_configs,
        prune_conv_fwd_configs,
    )

    configs = conv_fwd_configs(interpreter=False)
    args = {**_conv_named_args((14, 14), 256, 256), "FUSED": True,
            "x_ptr": torch.empty(1, dtype=torch.bfloat16)}
    one_pass = prune_conv_fwd_configs(configs, {**args, "NUM_EXPERTS": 4, "EXPERT_CHUNK": 4})
    passes = prune_conv_fwd_configs(configs, {**args, "NUM_EXPERTS": 17, "EXPERT_CHUNK": 6})
    def area(c):
        return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
    assert max(map(area, one_pass)) > CONV_FWD_MULTI_PASS_MAX_TILE
    assert passes and max(map(area, passes)) <= CONV_FWD_MULTI_PASS_MAX_TILE


def test_fused_configs_pruned_by_shared_memory():
    """Fused buffers EXPERT_CHUNK bank tiles per pipeline stage: wide fp32 tiles with 8 experts
    do not fit an sm_80's shared memory and are pruned there."""
    from dynconv.kernels.configs import (
        _CONV_FWD_IEEE,
        conv_fwd_configs,
        conv_fwd_shared_bytes,
        mnk_entry,
        prune_conv_fwd_configs,
        pruning_for_capability,
        sm90_only_config,
    )

    configs = conv_fwd_configs(interpreter=False)
    args = _conv_named_args((56, 56), 64, 128)
    args["x_ptr"] = torch.empty(1, 64, 1, 1, device="meta")
    with pruning_for_capability(80):
        premix = prune_conv_fwd_configs(configs, args)
        fused = prune_conv_fwd_configs(configs, args, FUSED=True, EXPERT_CHUNK=8)
    # BLOCK_K 64, 256-wide tiles and 4 stages: sm_90 bf16 only; nor is 256 wide for 128 channels.
    # (The ieee tiles are for fp32 with tf32 off.)
    narrow = [c for c in configs
              if not sm90_only_config(c) and mnk_entry(c) not in _CONV_FWD_IEEE]
    assert len(premix) == len(narrow)
    assert fused and len(fused) < len(narrow)
    assert all(conv_fwd_shared_bytes(c, 4, 8) <= 166912 for c in fused)


def test_conv_configs_with_int64_offsets():
    from dynconv.kernels.configs import (
        conv_fwd_configs,
        conv_fwd_int64_ok,
        prune_conv_fwd_configs,
    )

    configs = conv_fwd_configs(interpreter=False)
    kept = prune_conv_fwd_configs(configs, _conv_named_args((56, 56), 64, 128),
                                  OFFSET_64=True)
    assert kept and len(kept) < len(configs)
    assert all(conv_fwd_int64_ok(c) for c in kept)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bank_span_past_int32_is_refused(strategy):
    """The mix and fused conv step through the bank with int32 offsets: a larger bank fails with
    a ValueError before any launch (meta tensors stand in for the memory)."""
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(1, 4, 7, 5, **meta)
    routing = torch.empty(1, 3, **meta)
    huge_bank = torch.empty_strided((3, 6, 4, 3, 3), (2**30, 36, 9, 3, 1), **meta)
    with pytest.raises(ValueError, match="weight_bank spans 2147483863 elements"):
        triton_forward_impl(x, huge_bank, routing, None, (1, 1), (1, 1), (1, 1), 1,
                            strategy=strategy)


def test_float64_is_refused_with_a_clear_error():
    x, bank, routing, bias = make_inputs(Case(), torch.float32, DEVICE)
    as64 = [t.double() for t in (x, bank, routing, bias)]
    with pytest.raises(ValueError, match="backend='triton' supports dtypes .* got torch.float64"):
        dynconv.dynamic_conv2d(*as64, padding=1, backend="triton")


def test_auto_keeps_float64_off_triton():
    from dynconv.backends.registry import resolve

    assert resolve("auto", torch.ones(1, dtype=torch.float64)).name == "native"
    if torch.cuda.is_available():
        cuda64 = torch.ones(1, device="cuda", dtype=torch.float64)
        assert resolve("auto", cuda64).name == "native"
        assert resolve("auto", torch.ones(1, device="cuda")).name == "triton"


def test_fp32_ieee_dots_take_their_own_tiles():
    """fp32 with tf32 off ("ieee" dots, FMA with both operands in registers) keeps only the
    BLOCK_K = 16 tiles, which the compile-check measured without spills where the tf32 tiles
    spilled; tf32 and bf16 launches never see them."""
    from dynconv.kernels.configs import (
        _CONV_FWD_IEEE,
        conv_fwd_configs,
        fp32_ieee_dots,
        mnk_entry,
        prune_conv_fwd_configs,
        pruning_for_capability,
    )

    configs = conv_fwd_configs(interpreter=False)
    fp32 = {**_conv_named_args((56, 56), 64, 64), "x_ptr": torch.empty(1, device="meta"),
            "x_stride_c": 3136, "TAP_MAJOR": True, "DOT_FP32": False}
    bf16 = {**fp32, "x_ptr": torch.empty(1, dtype=torch.bfloat16, device="meta")}
    assert fp32_ieee_dots(fp32["x_ptr"], {**fp32, "INPUT_PRECISION": "ieee"})
    assert not fp32_ieee_dots(fp32["x_ptr"], {**fp32, "INPUT_PRECISION": "tf32"})
    assert not fp32_ieee_dots(bf16["x_ptr"], {**bf16, "INPUT_PRECISION": "ieee"})
    ieee_tiles = set(_CONV_FWD_IEEE)
    for capability in (80, 90):
        with pruning_for_capability(capability):
            for fused in ({"FUSED": False}, {"FUSED": True, "NUM_EXPERTS": 4,
                                             "EXPERT_CHUNK": 4}):
                ieee = prune_conv_fwd_configs(configs, {**fp32, **fused},
                                              INPUT_PRECISION="ieee")
                tf32 = prune_conv_fwd_configs(configs, {**fp32, **fused},
                                              INPUT_PRECISION="tf32")
                low = prune_conv_fwd_configs(configs, {**bf16, **fused},
                                             INPUT_PRECISION="ieee")
                assert ieee and {mnk_entry(c) for c in ieee} <= ieee_tiles
                # What spilled with ieee dots: BLOCK_K = 32, 64 x 64 on 4 warps, 128 x 64.
                assert all(c.kwargs["BLOCK_K"] == 16 for c in ieee)
                assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps
                           for c in ieee)
                for kept in (tf32, low):
                    assert kept and not {mnk_entry(c) for c in kept} & ieee_tiles
                assert any(mnk_entry(c) == (64, 64, 32, 4, 3) for c in tf32)
        # int64 offsets keep one ieee tile.
        with pruning_for_capability(capability):
            int64 = prune_conv_fwd_configs(configs, fp32, INPUT_PRECISION="ieee",
                                           OFFSET_64=True)
        assert [mnk_entry(c) for c in int64] == [(64, 16, 16, 8, 3)]


def test_conv_fwd_autotune_key_separates_tf32_from_ieee():
    from dynconv.kernels.configs import (
        CONV_BWD_DW_KEY,
        CONV_BWD_DX_KEY,
        CONV_FWD_KEY,
        CONV_FWD_SPANNING_KEY,
        MIX_KEY,
    )

    for key in (CONV_FWD_KEY, CONV_FWD_SPANNING_KEY, CONV_BWD_DX_KEY, CONV_BWD_DW_KEY,
                MIX_KEY):
        assert "INPUT_PRECISION" in key
