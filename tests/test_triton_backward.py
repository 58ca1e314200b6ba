"""The Triton backward (conv_bwd_dx + conv_bwd_dw kernels, through the dynconv::triton_* custom
ops) against torch autograd of a float64 per-sample loop: gradients of x, the kernel bank, the
routing weights and the bias bank.

Runs the compiled kernels on CUDA when a GPU is present, else the Triton interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). Shapes are tiny: the
interpreter costs about a millisecond per operation per program.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Case,
    assert_within_bound,
    backward_reduction_length,
    make_inputs,
    reference_gradients,
    upstream_gradient,
)

import dynconv
from dynconv.kernels._common import interpreter_enabled
from dynconv.kernels.conv_bwd_dw import conv_bwd_dw
from dynconv.kernels.conv_bwd_dx import conv_bwd_dx

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
INTERPRETER = not ON_GPU
if not ON_GPU and not interpreter_enabled():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)", allow_module_level=True)
pytestmark = [
    # The float64 reference's F.conv2d warns that padding="same" with an even kernel pads a copy.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
    # fp32 dots in ieee unless a test asks for tf32 (tests/conftest.py).
    pytest.mark.usefixtures("fp32_dots"),
]


def check_grads(actual, expected, scales, dtype, case: Case,
                names=("x", "bank", "routing", "bias"), tf32=False):
    """Each gradient against the float64 one within the rounding bound of ``dtype``
    (tests/helpers.py: relative to the sum of |terms| of each element, over the case's longest
    reduction)."""
    assert len(actual) == len(expected) == len(scales), (len(actual), len(expected))
    for name, got, ref, scale in zip(names, actual, expected, scales):
        assert_within_bound(got, ref, scale, dtype, backward_reduction_length(case), tf32=tf32,
                            name=f"grad of {name}")


# Case(batch, cin, cout, H, W, (kh, kw), stride, padding, dilation, groups, K, bias[, layout])
CASES = {
    "3x3": Case(2, 4, 6, 7, 5, (3, 3), 1, 1, 1, 1, 3, True),
    "stride2-groups2-K1": Case(3, 6, 6, 7, 7, (3, 3), 2, 1, 1, 2, 1, True),
    "depthwise-dil2-K5-nobias": Case(2, 4, 4, 6, 7, (3, 3), (2, 1), 2, 2, 4, 5, False),
    "batch1-odd-kernel": Case(1, 3, 5, 5, 6, (2, 3), (1, 2), (0, 1), (2, 1), 1, 2, True),
    "channels_last": Case(2, 4, 4, 6, 5, (3, 3), 1, 1, 1, 2, 3, True, "channels_last"),
    "1x1-stride2": Case(2, 5, 3, 5, 5, (1, 1), 2, 0, 1, 1, 2, False),
    "stride3-wide-pad": Case(2, 2, 4, 7, 6, (3, 3), 3, 2, 1, 1, 4, True),
    # More experts than conv_bwd_dw accumulates per program (8): three expert blocks of 6.
    "K17": Case(2, 2, 2, 4, 4, (3, 3), 1, 1, 1, 1, 17, True),
    # Even kernel, padding="same": the dispatcher pads the extra row / column before the op.
    "same-even-kernel": Case(2, 3, 4, 5, 6, (2, 2), 1, "same", 1, 1, 2, True),
}


def triton_grads(x, bank, routing, bias_bank, grad_out, geometry):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, bank, routing)]
    if bias_bank is not None:
        leaves.append(bias_bank.detach().clone().requires_grad_(True))
    bias = leaves[3] if bias_bank is not None else None
    y = dynconv.dynamic_conv2d(leaves[0], leaves[1], leaves[2], bias, backend="triton",
                               **geometry)
    y.backward(grad_out)
    return [t.grad for t in leaves]


def run_case(case: Case, dtype, tf32=False):
    x, bank, routing, bias_bank = make_inputs(case, dtype, DEVICE)
    geometry = case.geometry
    with torch.no_grad():
        y = dynconv.dynamic_conv2d(x, bank, routing, bias_bank, backend="loop", **geometry)
    grad_out = upstream_gradient(y.shape, dtype, DEVICE)
    got = triton_grads(x, bank, routing, bias_bank, grad_out, geometry)
    expected, scales = reference_gradients(grad_out, x, bank, routing, bias_bank, **geometry)
    if case.layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    check_grads(got, expected, scales, dtype, case, tf32=tf32)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_fp32(name):
    run_case(CASES[name], torch.float32)


@pytest.mark.parametrize("name", ["3x3", "depthwise-dil2-K5-nobias", "channels_last"])
def test_gradients_fp16(name):
    run_case(CASES[name], torch.float16)


def test_gradients_bf16():
    run_case(CASES["stride2-groups2-K1"], torch.bfloat16)


@pytest.mark.parametrize("fp32_dots", [True], ids=["tf32"], indirect=True)
def test_gradients_fp32_follow_tf32_setting(fp32_dots):
    """With cudnn.allow_tf32 the fp32 dots may use tf32 (on a GPU): the dot operands are then
    rounded to 10 mantissa bits (unit roundoff 2**-11), as fp16's; the interpreter stays ieee."""
    run_case(CASES["3x3"], torch.float32, tf32=fp32_dots)


@pytest.mark.parametrize("samples_per_program", [1, 2])
def test_batch_spanning_several_splits(samples_per_program):
    """conv_bwd_dw's batch split: each run of samples writes its own partial, summed at the end."""
    case = Case(5, 4, 6, 5, 5, (3, 3), 1, 1, 1, 2, 3, True)
    x, bank, routing, bias_bank = make_inputs(case, torch.float32, DEVICE)
    grad_out = upstream_gradient((5, 6, 5, 5), torch.float32, DEVICE)
    pairs = lambda v: (v, v)  # noqa: E731
    grad_bank, grad_routing, grad_bias = conv_bwd_dw(
        grad_out, x, bank, routing, bias_bank, pairs(1), pairs(1), pairs(1), 2,
        samples_per_program=samples_per_program, interpreter=INTERPRETER,
    )
    expected, scales = reference_gradients(grad_out, x, bank, routing, bias_bank,
                                           **case.geometry)
    check_grads([grad_bank, grad_routing, grad_bias], expected[1:], scales[1:], torch.float32,
                case, names=("bank", "routing", "bias"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("experts", [9, 17])
def test_input_gradient_in_expert_chunks(experts, dtype):
    """More experts than one pass of conv_bwd_dx mixes (configs.MAX_EXPERT_CHUNK): 9 experts
    take two passes (5 + 4), 17 take three (6 + 6 + 5); channels_last, two groups."""
    from dynconv.kernels.configs import MAX_EXPERT_CHUNK, expert_chunk

    assert expert_chunk(experts) < experts and MAX_EXPERT_CHUNK < experts
    case = Case(2, 4, 6, 5, 4, (3, 3), 1, 1, 1, 2, experts, False, "channels_last")
    x, bank, routing, _ = make_inputs(case, dtype, DEVICE)
    grad_out = upstream_gradient((2, 6, 5, 4), dtype, DEVICE)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    pairs = lambda v: (v, v)  # noqa: E731
    grad_x = conv_bwd_dx(grad_out, bank, routing, x.shape, pairs(1), pairs(1), pairs(1), 2,
                         interpreter=INTERPRETER)
    expected, scales = reference_gradients(grad_out, x, bank, routing, None, **case.geometry)
    check_grads([grad_x], expected[:1], scales[:1], dtype, case, names=("x",))


# conv_bwd_dx splits the input pixels into stride phases (ih % sh, iw % sw), each a dense GEMM
# over the taps that reach it: phases of unequal size (H, W not multiples of the stride), phases
# that no tap reaches (written as zeros: dilation sharing a factor with the stride, a kernel
# smaller than the stride), taps whose output grid is shifted past the border (wide padding).
PHASE_CASES = {
    "s2-k3-odd-sizes": Case(2, 4, 6, 9, 8, (3, 3), 2, 1, 1, 1, 3, False),
    "s2-dil2-empty-phases": Case(2, 3, 4, 9, 10, (3, 3), 2, 1, 2, 1, 2, False),
    "s2-dil2-pad2": Case(1, 3, 4, 9, 10, (3, 3), 2, 2, 2, 1, 2, False),
    "s3-k5": Case(2, 3, 5, 8, 7, (5, 5), 3, 2, 1, 1, 3, False),
    "s3-k2-empty-phases": Case(2, 2, 3, 8, 7, (2, 2), 3, 0, 1, 1, 2, False),
    "s(1,2)-k(3,5)-dil(2,1)": Case(2, 4, 4, 7, 9, (3, 5), (1, 2), (2, 2), (2, 1), 2, 3, False),
    "s(2,1)-k(5,3)-dil(1,3)": Case(2, 4, 4, 8, 9, (5, 3), (2, 1), (1, 3), (1, 3), 1, 2, False),
    "s2-k7-stem": Case(1, 3, 4, 13, 12, (7, 7), 2, 3, 1, 1, 2, False),
    "s2-1x1-pad0": Case(2, 5, 6, 7, 6, (1, 1), 2, 0, 1, 1, 2, False),
    "s2-pad0-unreached-rows": Case(2, 3, 4, 8, 8, (3, 3), 2, 0, 1, 1, 2, False),
    "s2-depthwise-cl": Case(2, 6, 6, 7, 9, (3, 3), 2, 1, 1, 6, 4, False, "channels_last"),
    "s3-pad-wider-than-kernel": Case(2, 2, 4, 5, 6, (3, 3), 3, 4, 1, 1, 2, False),
}


def run_input_gradient(case: Case, dtype):
    x, bank, routing, _ = make_inputs(case, dtype, DEVICE)
    pair = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)  # noqa: E731
    stride, padding, dilation = pair(case.stride), pair(case.padding), pair(case.dilation)
    with torch.no_grad():
        y = dynconv.dynamic_conv2d(x, bank, routing, None, backend="loop", **case.geometry)
    grad_out = upstream_gradient(y.shape, dtype, DEVICE)
    if case.layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    grad_x = conv_bwd_dx(grad_out, bank, routing, x.shape, stride, padding, dilation,
                         case.groups, interpreter=INTERPRETER)
    expected, scales = reference_gradients(grad_out, x, bank, routing, None, **case.geometry)
    check_grads([grad_x], expected[:1], scales[:1], dtype, case, names=("x",))


@pytest.mark.parametrize("name", list(PHASE_CASES))
def test_input_gradient_stride_phases(name):
    run_input_gradient(PHASE_CASES[name], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_input_gradient_stride_phases_low_precision(dtype):
    run_input_gradient(PHASE_CASES["s2-k3-odd-sizes"].replace(layout="channels_last"), dtype)


def test_input_gradient_stride_phases_expert_chunks():
    """Several expert passes (K = 17: 6 + 6 + 5) at stride 2: every pass walks the phase's taps
    from the start."""
    run_input_gradient(Case(2, 3, 4, 7, 6, (3, 3), 2, 1, 1, 1, 17, False), torch.float32)


@pytest.mark.parametrize("experts", [8, 9])
def test_weight_gradients_expert_blocks(experts):
    """conv_bwd_dw's named per-expert accumulators: 8 experts fill one program's block, 9 take
    two blocks (5 + 4); channels_last, two groups, with a bias bank (its terms in torch)."""
    from dynconv.kernels.configs import conv_bwd_dw_expert_block

    assert conv_bwd_dw_expert_block(experts) == (8 if experts == 8 else 5)
    case = Case(2, 4, 6, 5, 4, (3, 3), 1, 1, 1, 2, experts, True, "channels_last")
    x, bank, routing, bias_bank = make_inputs(case, torch.float32, DEVICE)
    grad_out = upstream_gradient((2, 6, 5, 4), torch.float32, DEVICE)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    pairs = lambda v: (v, v)  # noqa: E731
    grads = conv_bwd_dw(grad_out, x, bank, routing, bias_bank, pairs(1), pairs(1), pairs(1), 2,
                        interpreter=INTERPRETER)
    expected, scales = reference_gradients(grad_out, x, bank, routing, bias_bank,
                                           **case.geometry)
    check_grads(list(grads), expected[1:], scales[1:], torch.float32, case,
                names=("bank", "routing", "bias"))


def test_strided_views_in_and_out():
    """Non-contiguous grad_out, x and bank (slices), and a strided grad_x buffer."""
    case = Case(2, 4, 4, 6, 5, (3, 3), 1, 1, 1, 2, 3, True)
    _, _, routing, bias_bank = make_inputs(case, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 5, generator=gen).to(DEVICE)[:, ::2]
    bank = torch.randn(3, 4, 2, 3, 6, generator=gen).to(DEVICE)[..., ::2]
    grad_out = torch.randn(2, 4, 6, 10, generator=gen).to(DEVICE)[..., ::2]
    grad_x = torch.zeros(2, 4, 6, 10, device=DEVICE)[..., 1::2]
    pairs = lambda v: (v, v)  # noqa: E731
    conv_bwd_dx(grad_out, bank, routing, x.shape, pairs(1), pairs(1), pairs(1), 2, out=grad_x,
                interpreter=INTERPRETER)
    grads = conv_bwd_dw(grad_out, x, bank, routing, bias_bank, pairs(1), pairs(1), pairs(1), 2,
                        interpreter=INTERPRETER)
    expected, scales = reference_gradients(grad_out, x, bank, routing, bias_bank,
                                           **case.geometry)
    check_grads([grad_x, *grads], expected, scales, torch.float32, case)


@pytest.mark.parametrize("wanted", [(True, False, False, False), (False, False, True, False),
                                    (False, True, False, True)])
def test_only_requested_gradients(wanted):
    case = CASES["3x3"]
    x, bank, routing, bias_bank = make_inputs(case, torch.float32, DEVICE)
    leaves = [t.detach().clone().requires_grad_(w)
              for t, w in zip((x, bank, routing, bias_bank), wanted)]
    y = dynconv.dynamic_conv2d(*leaves, backend="triton", **case.geometry)
    grad_out = upstream_gradient(y.shape, torch.float32, DEVICE)
    y.backward(grad_out)
    expected, scales = reference_gradients(grad_out, x, bank, routing, bias_bank,
                                           **case.geometry)
    for leaf, w, ref, scale, name in zip(leaves, wanted, expected, scales,
                                         ("x", "bank", "routing", "bias")):
        if w:
            check_grads([leaf.grad], [ref], [scale], torch.float32, case, names=(name,))
        else:
            assert leaf.grad is None


def test_deterministic_mode_bit_identical():
    """No kernel of the backward uses atomics: two runs give the same bits."""
    case = Case(3, 4, 6, 6, 5, (3, 3), 2, 1, 1, 2, 4, True)
    x, bank, routing, bias_bank = make_inputs(case, torch.float32, DEVICE)
    geometry = case.geometry
    grad_out = upstream_gradient((3, 6, 3, 3), torch.float32, DEVICE)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = triton_grads(x, bank, routing, bias_bank, grad_out, geometry)
        second = triton_grads(x, bank, routing, bias_bank, grad_out, geometry)
    finally:
        torch.use_deterministic_algorithms(saved)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autograd_saves_only_inputs_and_parameters():
    """Saved for backward: x, the routing weights and the parameters; never W_b (B x |W|)."""
    case = CASES["3x3"]
    x, bank, routing, bias_bank = make_inputs(case, torch.float32, DEVICE)
    geometry = case.geometry
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, bank, routing, bias_bank)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dynconv.dynamic_conv2d(*leaves, backend="triton", **geometry)
    assert len(saved) == 4
    for t, leaf in zip(saved, leaves):
        assert t.shape == leaf.shape and t.data_ptr() == leaf.data_ptr()
    y.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves)


def test_training_matches_loop_step_for_step():
    """Three SGD steps of a tiny DynamicCNN: backend='triton' against backend='loop'."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, num_classes=4, num_experts=3, widths=(4, 6, 8),
                  stem_channels=4)
    nets = {b: dynconv.DynamicCNN(backend=b, **kwargs).to(DEVICE) for b in ("loop", "triton")}
    nets["triton"].load_state_dict(nets["loop"].state_dict())
    opts = {b: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            for b, net in nets.items()}
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8, generator=gen).to(DEVICE)
        target = torch.randint(0, 4, (2,), generator=gen).to(DEVICE)
        losses = {}
        for b, net in nets.items():
            opts[b].zero_grad()
            loss = F.cross_entropy(net(x), target)
            loss.backward()
            opts[b].step()
            losses[b] = loss.item()
        # fp32 throughout; differences are rounding (different summation orders), amplified a
        # little by BatchNorm over a batch of 2 and by three steps of SGD. Each gradient's
        # rounding is relative to its largest element (measured: 3-5e-6 of it, for triton and
        # native alike), so an element much smaller than its tensor's largest gets an error
        # relative to that one: the absolute tolerance follows each tensor's scale.
        assert abs(losses["triton"] - losses["loop"]) <= 1e-4 * max(1.0, abs(losses["loop"]))
        for (name, p), q in zip(nets["loop"].named_parameters(), nets["triton"].parameters()):
            assert torch.allclose(q, p, rtol=1e-4, atol=1e-4 * p.abs().max().item()), name


def test_spans_past_int32_are_refused():
    """The kernels use int32 offsets inside a sample and the bank: larger spans fail loudly
    (checked before any launch; meta tensors stand in for the memory)."""
    meta = dict(device="meta", dtype=torch.float32)
    x = torch.empty(2, 4, 7, 5, **meta)
    routing = torch.empty(2, 3, **meta)
    huge_bank = torch.empty_strided((3, 6, 4, 3, 3), (2**31, 36, 9, 3, 1), **meta)
    grad_out = torch.empty(2, 6, 7, 5, **meta)
    pairs = lambda v: (v, v)  # noqa: E731
    with pytest.raises(ValueError, match="weight_bank spans"):
        conv_bwd_dx(grad_out, huge_bank, routing, x.shape, pairs(1), pairs(1), pairs(1), 1,
                    interpreter=INTERPRETER)
    with pytest.raises(ValueError, match="weight_bank spans"):
        conv_bwd_dw(grad_out, x, huge_bank, routing, None, pairs(1), pairs(1), pairs(1), 1,
                    interpreter=INTERPRETER)


def test_backward_fp32_ieee_dots_take_their_own_configs():
    """fp32 with tf32 off: the input gradient keeps only its BLOCK_K = 16 tiles and the weight
    gradient its 16-pixel configs but those measured to spill on the gW tile (the tf32 ones
    spilled there); tf32 launches never
    see them."""
    from dynconv.kernels.configs import (
        _CONV_BWD_DW_IEEE,
        _CONV_BWD_DX_IEEE,
        CONV_BWD_DW_IEEE_MEASURED_SPILLS,
        conv_bwd_dw_configs,
        conv_bwd_dx_configs,
        mnk_entry,
        prune_conv_bwd_dw_configs,
        prune_conv_bwd_dx_configs,
        pruning_for_capability,
    )

    fp32 = torch.empty(1, device="meta")
    dx_args = {"gy_ptr": fp32, "C_IN_G": 64, "C_OUT_G": 64, "H": 56, "W": 56, "STRIDE_H": 1,
               "STRIDE_W": 1, "EXPERT_CHUNK": 1, "DOT_FP32": False}
    dx = conv_bwd_dx_configs(interpreter=False)
    for capability in (80, 90):
        with pruning_for_capability(capability):
            ieee = prune_conv_bwd_dx_configs(dx, dx_args, INPUT_PRECISION="ieee")
            tf32 = prune_conv_bwd_dx_configs(dx, dx_args, INPUT_PRECISION="tf32")
        assert ieee and {mnk_entry(c) for c in ieee} <= set(_CONV_BWD_DX_IEEE)
        assert tf32 and not {mnk_entry(c) for c in tf32} & set(_CONV_BWD_DX_IEEE)
        assert any(mnk_entry(c) == (64, 64, 32, 4, 3) for c in tf32)  # spilled with ieee

    dw = conv_bwd_dw_configs(interpreter=False)
    dw_args = {"x_ptr": fp32, "HO": 56, "WO": 56}

    def entries(kept):
        return {(c.kwargs["BLOCK_P"], c.num_warps, c.num_stages) for c in kept}

    for tile in ((64, 16), (16, 16), (16, 32), (16, 64)):
        meta = {"K_BLOCK": 4, "BLOCK_M": tile[0], "BLOCK_N": tile[1], "DOT_FP32": False}
        ieee = entries(prune_conv_bwd_dw_configs(dw, dw_args, **meta, INPUT_PRECISION="ieee"))
        assert ieee and ieee <= set(_CONV_BWD_DW_IEEE)
        assert not {(*tile, *e) for e in ieee} & CONV_BWD_DW_IEEE_MEASURED_SPILLS
        tf32 = entries(prune_conv_bwd_dw_configs(dw, dw_args, **meta, INPUT_PRECISION="tf32"))
        assert tf32 and not tf32 & set(_CONV_BWD_DW_IEEE)
