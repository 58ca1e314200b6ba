"""The native (CPU) backend: every formulation, forced, against an independent float64 per-sample
loop (forward and the gradients of x, the bank, the bias bank and the routing weights), chunk
boundaries, what autograd saves, channels_last, the selection rule's contract, and
torch.library.opcheck of its custom ops (dynconv::native_forward / native_backward)."""

import pytest
import torch
from helpers import (
    OP_CASE,
    Case,
    case_id,
    make_inputs,
    op_args,
    reference_dynamic_conv2d,
    upstream_gradient,
)

from dynconv import dynamic_conv2d
from dynconv.backends.native import op as native
from dynconv.backends.native.formulations import FORMULATIONS
from dynconv.backends.native.op import native_backward, native_forward
from dynconv.backends.native.rule import FormulationPlan, choose_formulations

# Case(batch, cin, cout, H, W, (kh, kw), stride, padding, dilation, groups, K, bias)
CASES = [
    Case(3, 4, 6, 7, 6, (3, 3), 1, 1, 1, 1, 4, True),
    Case(2, 3, 5, 6, 7, (1, 1), 1, 0, 1, 1, 3, False),  # 1x1
    Case(2, 5, 4, 9, 8, (3, 3), 2, 1, 1, 1, 2, True),  # stride 2, odd channels
    Case(2, 6, 4, 9, 9, (3, 5), (1, 2), (2, 1), (2, 1), 2, 3, True),  # groups, pairs, dilation
    Case(3, 6, 6, 8, 7, (3, 3), 1, 1, 1, 6, 2, True),  # depthwise
    Case(1, 4, 4, 5, 5, (2, 2), 1, 0, 1, 1, 1, True),  # batch 1, K = 1, even kernel
]


def _forward_backward(fn, tensors, upstream_seed=1):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    upstream = upstream_gradient(y.shape, y.dtype, seed=upstream_seed)
    y.backward(upstream)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _check_against_reference(case, formulation, chunk=None, channels_last=False):
    if channels_last:
        case = case.replace(layout="channels_last")
    x, bank, routing, bias = make_inputs(case)
    geometry = case.geometry
    want_y, want_grads = _forward_backward(
        lambda *t: reference_dynamic_conv2d(*t, **geometry), (x, bank, routing, bias)
    )
    with native.force_formulation(formulation, chunk):
        got_y, got_grads = _forward_backward(
            lambda *t: dynamic_conv2d(*t, backend="native", **geometry), (x, bank, routing, bias)
        )
    # float64 against float64: only summation order differs, ~1e-15 relative per product.
    torch.testing.assert_close(got_y, want_y, rtol=1e-10, atol=1e-10)
    names = ("x", "bank", "routing", "bias")
    for name, got, want in zip(names, got_grads, want_grads, strict=True):
        if want is None:
            assert got is None, name
            continue
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")
    if channels_last:
        assert got_y.is_contiguous(memory_format=torch.channels_last)


# Each part by a different formulation, as the rule may pick them.
MIXED_PLANS = [
    ("per_sample", "per_sample", "im2col"),
    ("im2col", "per_sample", "grouped"),
    ("grouped", "im2col", "per_sample"),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_formulation_matches_float64_loop(formulation, case):
    _check_against_reference(case, formulation)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("plan", MIXED_PLANS, ids="/".join)
def test_mixed_plan_matches_float64_loop(plan, case):
    _check_against_reference(case, plan, chunk=2)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_formulation_channels_last(formulation):
    _check_against_reference(CASES[0], formulation, chunk=2, channels_last=True)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_chunk_boundary_batch_of_chunk_plus_one(formulation):
    # 5 samples in chunks of 4: one full chunk and a chunk of one.
    case = Case(5, 4, 6, 6, 6, (3, 3), 1, 1, 1, 2, 3, True)
    _check_against_reference(case, formulation, chunk=4)


def test_budget_sets_chunk_size(monkeypatch):
    # Budget for 3 samples of the largest per-sample temporary: 7 samples run as 3, 3, 1.
    monkeypatch.setattr(native, "MIXED_WEIGHT_BUDGET_BYTES", 3 * 100 * 8)
    assert native.batch_chunk_size(7, 100, 8) == 3
    assert native.batch_chunk_size(7, 10, 8, sample_temp_numel=100) == 3
    assert native.batch_chunk_size(2, 100, 8) == 2
    assert native.batch_chunk_size(7, 10_000, 8) == 1


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_gradcheck_float64(formulation):
    case = Case(3, 2, 2, 4, 4, (3, 3), 1, 1, 1, 1, 2, True)
    leaves = tuple(t.requires_grad_(True) for t in make_inputs(case))

    def fn(*t):
        return dynamic_conv2d(*t, backend="native", **case.geometry)

    # Three samples in chunks of two: the chunk loop is part of what is checked.
    with native.force_formulation(formulation, chunk=2):
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_saved_tensors_exclude_mixed_weights(formulation, monkeypatch):
    # Above the saving threshold (max(x / 4, SAVE_MIXED_MIN_BYTES); the floor set to 0 here so
    # that a tiny case is above it) the B x |W| mixed weights are never saved.
    monkeypatch.setattr(native, "SAVE_MIXED_MIN_BYTES", 0)
    batch, cin, cout, k = 6, 4, 5, 3
    case = Case(batch, cin, cout, 6, 6, (k, k), 1, 1, 1, 1, 3, True)
    x, bank, routing, bias = make_inputs(case)
    geometry = case.geometry
    leaves = [t.requires_grad_(True) for t in (x, bank, routing, bias)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with native.force_formulation(formulation), torch.autograd.graph.saved_tensors_hooks(
        pack, lambda t: t
    ):
        y = dynamic_conv2d(*leaves, backend="native", **geometry)
    assert saved, "the op saved nothing for backward"
    mixed_numel = batch * cout * cin * k * k
    for t in saved:
        assert t.numel() < mixed_numel or t.shape == x.shape, tuple(t.shape)
        assert tuple(t.shape) != (batch, cout, cin, k, k)
    y.sum().backward()


def test_chunks_hold_k_samples_below_the_large_temporary_limit(monkeypatch):
    # |W| = 6*4*3*3 = 216 float64 values = 1728 bytes; a budget of one sample's weights gives
    # chunks of 1, raised to K = 4 samples, unless 4 samples pass LARGE_TEMPORARY_BYTES.
    x, bank, _, _ = make_inputs(Case(8, 4, 6, 7, 6, (3, 3), 1, 1, 1, 1, 4, True))
    args = (x, bank, [1, 1], [1, 1], [1, 1], 1)
    monkeypatch.setattr(native, "MIXED_WEIGHT_BUDGET_BYTES", 1728)
    assert native._plan(*args)[1] == 4
    # Chunks are balanced: 9 samples in chunks of at most 4 run as 3 + 3 + 3.
    assert native._plan(torch.cat([x, x[:1]]), *args[1:])[1] == 3
    monkeypatch.setattr(native, "LARGE_TEMPORARY_BYTES", 2 * 1728)
    assert native._plan(*args)[1] == 2
    monkeypatch.setattr(native, "LARGE_TEMPORARY_BYTES", 1000)
    assert native._plan(*args)[1] == 1
    # Where the chunk's weight-sized temporaries all live in the reused workspace (mixed
    # weights, and a weight gradient written into it: per_sample / im2col), the limit does
    # not apply to them: K samples, as much as the bank.
    with native.force_formulation(("grouped", "grouped", "per_sample")):
        assert native._plan(*args)[1] == 4
    # ... but im2col patches (here 4 * 9 * 42 values per sample) are fresh temporaries.
    with native.force_formulation(("grouped", "grouped", "im2col")):
        assert native._plan(*args)[1] == 1
    # A low-precision weight gradient is copied to fp32 (fresh) before it is summed: one
    # sample's copy (864 bytes) is within the budget and the limit, two are not.
    bf16 = (x.to(torch.bfloat16), bank.to(torch.bfloat16)) + args[2:]
    monkeypatch.setattr(native, "MIXED_WEIGHT_BUDGET_BYTES", 864)
    with native.force_formulation(("grouped", "grouped", "per_sample")):
        assert native._plan(*bf16)[1] == 1


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_workspace_reuse_between_calls_keeps_results(formulation):
    # The mixed weights of every call share one workspace: a second forward before the first
    # backward must change neither the first output nor its gradients.
    case = Case(5, 4, 6, 7, 6, (3, 3), 1, 1, 1, 1, 3, True)
    x, bank, routing, bias = make_inputs(case)
    geometry = case.geometry
    x2, _, routing2, _ = make_inputs(case, seed=7)
    want_y, want_grads = _forward_backward(
        lambda *t: reference_dynamic_conv2d(*t, **geometry), (x, bank, routing, bias)
    )
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, bank, routing, bias)]
    with native.force_formulation(formulation, chunk=2):
        y = dynamic_conv2d(*leaves, backend="native", **geometry)
        y_first = y.detach().clone()
        dynamic_conv2d(x2, bank, routing2, bias, backend="native", **geometry)
        torch.testing.assert_close(y.detach(), y_first, rtol=0, atol=0)
        y.backward(upstream_gradient(y.shape, y.dtype))
    torch.testing.assert_close(y_first, want_y, rtol=1e-10, atol=1e-10)
    for leaf, want in zip(leaves, want_grads, strict=True):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_weight_gradient_workspace_reused_across_chunks_and_calls(formulation):
    # The per_sample and im2col weight gradients of every chunk are written into one reused
    # workspace slot (the grouped one's come from convolution_backward): two steps whose
    # backward passes run one after the other, each in three chunks, both match the loop.
    case = Case(5, 4, 6, 7, 6, (3, 3), 1, 1, 1, 1, 3, True)
    geometry = case.geometry
    native.clear_workspace()
    steps = []
    for seed in (0, 7):
        inputs = make_inputs(case, seed=seed)
        steps.append((inputs, _forward_backward(
            lambda *t: reference_dynamic_conv2d(*t, **geometry), inputs)))
    with native.force_formulation(formulation, chunk=2):
        runs = []
        for inputs, _ in steps:
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            runs.append((leaves, dynamic_conv2d(*leaves, backend="native", **geometry)))
        for _leaves, y in runs:
            y.backward(upstream_gradient(y.shape, y.dtype))
    for (leaves, _), (_, (_, want_grads)) in zip(runs, steps, strict=True):
        for leaf, want in zip(leaves, want_grads, strict=True):
            torch.testing.assert_close(leaf.grad, want, rtol=1e-10, atol=1e-10)
    slots = {key[0] for key in native._workspace.buffers}
    assert (native.GRAD_MIXED in slots) == (formulation != "grouped")


def test_workspace_survives_inference_mode_and_fake_tensors():
    # The workspace is made on the first call; that call may run under inference_mode or with
    # fake tensors (shape tracing), and later ordinary calls must still work.
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = Case(3, 4, 6, 7, 6, (3, 3), 1, 1, 1, 1, 4, True)
    x, bank, routing, bias = make_inputs(case, dtype=torch.float32)
    geometry = case.geometry
    native.clear_workspace()
    with torch.inference_mode():
        dynamic_conv2d(x, bank, routing, bias, backend="native", **geometry)
    native.clear_workspace()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, bank, routing, bias)]
        assert dynamic_conv2d(*fake, backend="native", **geometry).shape == (3, 6, 7, 6)
    for _ in range(2):  # after each kind of first call, a training step
        want_y, want_grads = _forward_backward(
            lambda *t: reference_dynamic_conv2d(*t, **geometry), (x, bank, routing, bias)
        )
        got_y, got_grads = _forward_backward(
            lambda *t: dynamic_conv2d(*t, backend="native", **geometry), (x, bank, routing, bias)
        )
        # float32 against float32, summation order only: a few ulps of values of order 1.
        torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
        for got, want in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        native.clear_workspace()
        with torch.inference_mode():
            dynamic_conv2d(x, bank, routing, bias, backend="native", **geometry)


def test_low_precision_chunks_count_fp32_weight_gradients(monkeypatch):
    # bf16 weight gradients are summed in fp32: the chunk budget counts 4 bytes per value.
    x, bank, _, _ = make_inputs(Case(9, 4, 6, 7, 6, (3, 3), 1, 1, 1, 1, 1, True))
    args = (x.to(torch.bfloat16), bank.to(torch.bfloat16), [1, 1], [1, 1], [1, 1], 1)
    monkeypatch.setattr(native, "MIXED_WEIGHT_BUDGET_BYTES", 3 * 216 * 4)  # |W| = 216
    assert native._plan(*args)[1] == 3


def test_only_requested_gradients_are_computed():
    x, bank, routing, bias = make_inputs(CASES[0])
    geometry = CASES[0].geometry
    want_y, want_grads = _forward_backward(
        lambda *t: reference_dynamic_conv2d(*t, **geometry), (x, bank, routing, bias)
    )
    x_leaf = x.clone().requires_grad_(True)
    y = dynamic_conv2d(x_leaf, bank, routing, bias, backend="native", **geometry)
    y.backward(upstream_gradient(y.shape, y.dtype))
    torch.testing.assert_close(x_leaf.grad, want_grads[0], rtol=1e-10, atol=1e-10)


def test_force_formulation_rejects_unknown_names():
    for bad in ("winograd", ("grouped", "im2col"), ("grouped", "im2col", "fft"), 3):
        with pytest.raises(ValueError, match="formulation"):
            with native.force_formulation(bad):
                pass
    with pytest.raises(ValueError, match="chunk"):
        with native.force_formulation(chunk=0):
            pass


def _rule(batch, cin, cout, hw, kernel=(3, 3), groups=1, threads=2, stride=1):
    out_hw = tuple((size - 1) // stride + 1 for size in hw)
    return choose_formulations(batch, cin, cout, hw, kernel, out_hw, groups, torch.float32,
                               False, threads, (stride, stride))


@pytest.mark.parametrize("threads", [1, 2, 16])
@pytest.mark.parametrize("shape", [
    (32, 64, 64, (32, 32)), (64, 128, 128, (16, 16)), (16, 256, 256, (14, 14)),
    (128, 64, 64, (8, 8)), (1, 3, 8, (5, 5)), (4, 512, 512, (7, 7)),
])
def test_rule_returns_a_formulation_per_part(shape, threads):
    batch, cin, cout, hw = shape
    for groups in (1, cin):
        if cout % groups:
            continue
        for stride in (1, 2):
            plan = _rule(batch, cin, cout, hw, groups=groups, threads=threads, stride=stride)
            assert isinstance(plan, FormulationPlan)
            assert all(part in FORMULATIONS for part in plan), plan


def test_rule_branches():
    # The measured branches (dynconv/backends/native/rule.py): 1x1 -> im2col; 64 channels and
    # grouped layers -> grouped; many channels and pixels -> per-sample forward and input gradient;
    # (from batch 16, or 512 channels); a long reduction -> im2col weight gradient (and forward
    # at few pixels); a stride changes nothing (second pass: its im2col input gradient lost).
    assert _rule(4, 64, 128, (56, 56), kernel=(1, 1)) == ("im2col",) * 3
    assert _rule(16, 64, 64, (14, 14)) == ("grouped",) * 3
    assert _rule(4, 144, 144, (56, 56), groups=144) == ("grouped",) * 3
    assert _rule(64, 128, 128, (16, 16)) == ("per_sample", "per_sample", "grouped")
    assert _rule(16, 128, 128, (14, 14)) == ("grouped",) * 3
    assert _rule(16, 256, 256, (14, 14)) == ("per_sample", "per_sample", "im2col")
    assert _rule(4, 256, 256, (14, 14)) == ("grouped", "grouped", "im2col")
    assert _rule(4, 512, 512, (7, 7)) == ("im2col", "per_sample", "im2col")
    assert _rule(4, 64, 128, (56, 56), stride=2) == ("grouped",) * 3


def test_rule_bf16_channels_last_without_native_bf16(monkeypatch):
    # On a CPU without native bf16 convolutions (measured: AMD EPYC Zen 2) a bf16 channels_last
    # layer the fp32 rule runs grouped gets per-sample forward and weight gradient; elsewhere,
    # and for other dtypes, layouts or plans, the fp32 rule.
    from dynconv.backends.native import rule

    def plan(dtype=torch.bfloat16, channels_last=True, cin=64, hw=(14, 14)):
        return choose_formulations(16, cin, cin, hw, (3, 3), hw, 1, dtype, channels_last, 1,
                                   (1, 1))

    monkeypatch.setattr(rule, "_native_bf16", False)
    assert plan() == ("per_sample", "grouped", "per_sample")
    assert plan(channels_last=False) == ("grouped",) * 3
    assert plan(dtype=torch.float32) == ("grouped",) * 3
    assert plan(cin=256) == ("per_sample", "per_sample", "im2col")
    monkeypatch.setattr(rule, "_native_bf16", True)
    assert plan() == ("grouped",) * 3


def test_rule_follows_thread_count():
    # Per-sample convolutions parallelise within a sample: with 16 threads the 128-channel
    # 16x16 layer has too little work per thread for them and stays grouped.
    assert _rule(64, 128, 128, (16, 16), threads=1).forward == "per_sample"
    assert _rule(64, 128, 128, (16, 16), threads=2).forward == "per_sample"
    assert _rule(64, 128, 128, (16, 16), threads=16).forward == "grouped"


def test_compiled_op_chooses_formulation_at_run_time():
    # fullgraph + dynamic shapes: the op is opaque, so the formulation is chosen per call on
    # concrete shapes (here forced differently for two batch sizes) without a recompile.
    # (Batches 2 and 3: dynamo always specialises a size of 1.)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x, bank, routing, bias = make_inputs(CASES[0])
    geometry = CASES[0].geometry

    def fn(*t):
        return dynamic_conv2d(*t, backend="native", **geometry)

    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for batch, plan in ((2, "per_sample"), (3, ("im2col", "grouped", "im2col"))):
        tensors = (x[:batch].contiguous(memory_format=torch.channels_last), bank,
                   routing[:batch], bias)
        want_y, want_grads = _forward_backward(
            lambda *t: reference_dynamic_conv2d(*t, **geometry), tensors
        )
        with native.force_formulation(plan):
            got_y, got_grads = _forward_backward(compiled, tensors)
        torch.testing.assert_close(got_y, want_y, rtol=1e-10, atol=1e-10)
        for got, want in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert counter.frame_count == 1


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_empty_batch(formulation):
    case = CASES[0].replace(batch=0)
    leaves = [t.requires_grad_(True) for t in make_inputs(case)]
    bank = leaves[1]
    with native.force_formulation(formulation):
        y = dynamic_conv2d(*leaves, backend="native", **case.geometry)
    assert y.shape == (0, bank.shape[1], 7, 6)
    y.sum().backward()
    assert torch.count_nonzero(leaves[1].grad) == 0 and leaves[0].grad.shape == leaves[0].shape


# --- the custom ops -----------------------------------------------------------------------------

# dynconv::native_forward / native_backward are what torch.compile sees: torch.library.opcheck
# checks their schema, their fakes against the real results (sizes, strides, dtype), their
# autograd registration and AOT dispatch with static and dynamic shapes.
OP_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
OP_BIAS = pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
OP_LAYOUTS = pytest.mark.parametrize("layout", ["nchw", "channels_last"])


@OP_DTYPES
@OP_BIAS
@OP_LAYOUTS
def test_opcheck_forward(layout, bias, dtype):
    torch.library.opcheck(native_forward,
                          op_args(OP_CASE.replace(layout=layout, bias=bias), dtype))


def _opcheck_backward(case, dtype, mask):
    args = op_args(case, dtype, requires_grad=False)
    with torch.no_grad():
        y = native_forward(*args)
    torch.library.opcheck(native_backward, (upstream_gradient(y.shape, dtype), *args, mask))


@pytest.mark.parametrize("mask", [[True, True, True, True], [False, True, False, True]],
                         ids=["all", "bank-bias"])
@OP_DTYPES
@OP_BIAS
@OP_LAYOUTS
def test_opcheck_backward(layout, bias, dtype, mask):
    _opcheck_backward(OP_CASE.replace(layout=layout, bias=bias), dtype, mask)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_opcheck_every_formulation_in_chunks(formulation):
    """Each formulation, three samples in chunks of two (a partial last chunk), x and routing
    gradients only."""
    case = OP_CASE.replace(batch=3, layout="channels_last")
    with native.force_formulation(formulation, chunk=2):
        torch.library.opcheck(native_forward, op_args(case, torch.float64))
        _opcheck_backward(case, torch.float64, [True, False, True, False])


# --- saved mixed weights (eager, small |W|) and the plan cache ----------------------------------

# |W| = 2 * 2 * 3 * 3 = 36 values per sample, x has 2 * H * W: the weights are saved when
# 4 * 36 <= 2 * H * W, i.e. from 72 pixels (8x9) on, and not at 70 (7x10).
SAVING_CASE = Case(3, 2, 2, 8, 9, (3, 3), 1, 1, 1, 1, 3, True)


def _saved_shapes(case, formulation=None, chunk=None):
    x, bank, routing, bias = make_inputs(case)
    leaves = [t.requires_grad_(True) for t in (x, bank, routing, bias)]
    saved = []
    with native.force_formulation(formulation, chunk), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
    ):
        y = dynamic_conv2d(*leaves, backend="native", **case.geometry)
    y.sum().backward()
    return saved


def test_mixed_weights_saved_only_up_to_a_quarter_of_x(monkeypatch):
    # The fraction of x alone (the 16 MiB floor off: see test_save_threshold_has_a_16_mib_floor).
    monkeypatch.setattr(native, "SAVE_MIXED_MIN_BYTES", 0)
    weight_numel = 2 * 2 * 3 * 3
    saving = _saved_shapes(SAVING_CASE)
    assert (3, weight_numel) in saving
    assert 4 * 3 * weight_numel <= 3 * 2 * 8 * 9
    assert (3, weight_numel) not in _saved_shapes(SAVING_CASE.replace(h=7, w=10))
    # The plan says so too, at the boundary and below it.
    x, bank, _, _ = make_inputs(SAVING_CASE)
    args = ([1, 1], [1, 1], [1, 1], 1)
    assert native._plan(x, bank, *args).save_mixed
    assert not native._plan(x[:, :, :7, :10], bank, *args).save_mixed
    # Never the large layers of the memory goal: B=64, C=128, 16x16 (|W| x B = 4.5 x |x|).
    big_x, big_bank = torch.empty(64, 128, 16, 16), torch.empty(4, 128, 128, 3, 3)
    assert not native._plan(big_x, big_bank, *args).save_mixed


def test_mixed_weights_not_saved_without_grad():
    x, bank, routing, bias = make_inputs(SAVING_CASE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dynamic_conv2d(x, bank, routing, bias, backend="native", **SAVING_CASE.geometry)
        with torch.no_grad():
            dynamic_conv2d(x, bank.requires_grad_(True), routing, bias, backend="native",
                           **SAVING_CASE.geometry)
    assert not saved


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_saved_mixed_weights_match_recompute_and_float64_loop(formulation, chunk, layout,
                                                               monkeypatch):
    case = SAVING_CASE.replace(layout=layout)
    assert (3, 36) in _saved_shapes(case, formulation, chunk)
    _check_against_reference(case, formulation, chunk)
    tensors = make_inputs(case)

    def run():
        with native.force_formulation(formulation, chunk):
            return _forward_backward(
                lambda *t: dynamic_conv2d(*t, backend="native", **case.geometry), tensors)

    saved_y, saved_grads = run()
    monkeypatch.setattr(native, "SAVE_MIXED_MAX_FRACTION", 0.0)
    monkeypatch.setattr(native, "SAVE_MIXED_MIN_BYTES", 0)
    assert (3, 36) not in _saved_shapes(case, formulation, chunk)
    recomputed_y, recomputed_grads = run()
    # The saved weights are the very values the recompute makes: identical results.
    torch.testing.assert_close(saved_y, recomputed_y, rtol=0, atol=0)
    for got, want in zip(saved_grads, recomputed_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_saved_mixed_weights_double_backward():
    # create_graph=True goes through the differentiable path whatever was saved (the
    # formulation forced: the native autograd.Function, not autograd's graph of the trick).
    case = SAVING_CASE.replace(batch=2)
    leaves = tuple(t.requires_grad_(True) for t in make_inputs(case))
    with native.force_formulation("grouped"):
        assert torch.autograd.gradgradcheck(
            lambda *t: dynamic_conv2d(*t, backend="native", **case.geometry), leaves,
            fast_mode=True)


def test_plan_cache_follows_threads_shapes_dtype_and_forcing():
    native.clear_plan_cache()
    x, bank, _, _ = make_inputs(Case(16, 128, 128, 16, 16, (3, 3), 1, 1, 1, 1, 2, False),
                                dtype=torch.float32)
    args = ([1, 1], [1, 1], [1, 1], 1)

    def fresh(xx, bb):
        return native._make_plan(xx, bb, *args)

    threads = torch.get_num_threads()
    try:
        for t in (1, 16, 1):
            torch.set_num_threads(t)
            for xx, bb in ((x, bank), (x[:4], bank), (x.double(), bank.double()),
                           (x.contiguous(memory_format=torch.channels_last), bank),
                           (x[:, :, :8, :8], bank)):
                assert native._plan(xx, bb, *args) == fresh(xx, bb)
                with native.force_formulation("im2col", chunk=3):
                    plan = native._plan(xx, bb, *args)
                    assert plan == fresh(xx, bb)
                    assert plan.formulations == ("im2col",) * 3 and plan.chunk == 3
        torch.set_num_threads(1)
        assert native._plan(x, bank, *args).formulations.forward == "per_sample"
        torch.set_num_threads(16)
        assert native._plan(x, bank, *args).formulations.forward == "grouped"
    finally:
        torch.set_num_threads(threads)
    assert 0 < len(native._plan_cache) <= native.PLAN_CACHE_SIZE


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(native, "PLAN_CACHE_SIZE", 3)
    native.clear_plan_cache()
    bank = torch.empty(2, 4, 4, 3, 3)
    for batch in range(1, 10):
        native._plan(torch.empty(batch, 4, 6, 6), bank, [1, 1], [1, 1], [1, 1], 1)
        assert len(native._plan_cache) <= 3


# --- small is small in bytes too: the 16 MiB floor and the graph path --------------------------

# The plan's verdicts on meta tensors (no memory): |W| = 128 * 128 * 4 * 4 fp32 = 1 MiB, so 16
# samples of mixed weights are exactly SAVE_MIXED_MIN_BYTES; the rule runs this layer grouped.
_MIB_BANK = torch.empty(2, 128, 128, 4, 4, device="meta")


def _meta_plan(batch, hw):
    return native._plan(torch.empty(batch, 128, hw, hw, device="meta"), _MIB_BANK, [1, 1],
                        [1, 1], [1, 1], 1)


def test_save_threshold_has_a_16_mib_floor():
    # B x |W| <= max(x / 4, 16 MiB): 16 MiB saves whatever x's size, one sample more does not
    # (x at 4x4: 139 KiB), unless x / 4 is larger (91x91: x / 4 = 17.1 MiB >= 17 MiB).
    assert native.SAVE_MIXED_MIN_BYTES == 16 * 2**20
    assert _meta_plan(16, 4).save_mixed and _meta_plan(16, 4).graph
    assert not _meta_plan(17, 4).save_mixed and not _meta_plan(17, 4).graph
    assert _meta_plan(17, 91).save_mixed
    # Never the layer of the memory goal: B=64, C=128, 16x16 (B x |W| = 37.7 MB, x / 4 = 2 MiB).
    big = native._plan(torch.empty(64, 128, 16, 16, device="meta"),
                       torch.empty(4, 128, 128, 3, 3, device="meta"), [1, 1], [1, 1], [1, 1], 1)
    assert not big.save_mixed and not big.graph
    # The wide layers whose rule has an im2col weight gradient (or forward) take the graph too
    # (grouped input gradient); a 1x1 layer (im2col throughout) does not.
    wide = native._plan(torch.empty(4, 256, 14, 14, device="meta"),
                        torch.empty(4, 256, 256, 3, 3, device="meta"), [1, 1], [1, 1], [1, 1], 1)
    assert wide.formulations == ("grouped", "grouped", "im2col") and wide.graph
    one_by_one = native._plan(torch.empty(4, 64, 56, 56, device="meta"),
                              torch.empty(4, 128, 64, 1, 1, device="meta"), [2, 2], [0, 0],
                              [1, 1], 1)
    assert one_by_one.save_mixed and not one_by_one.graph
    # recompute_mixed_weights turns both off (the lean path everywhere).
    with native.recompute_mixed_weights():
        assert not _meta_plan(1, 4).save_mixed and not _meta_plan(1, 4).graph


def _case_plan(case, x, bank):
    def pair(v):
        return list(v) if isinstance(v, tuple) else [v, v]

    return native._plan(x, bank, pair(case.stride), pair(case.padding), pair(case.dilation),
                        case.groups)


def _grad_fn_name(case, formulation=None, **grad):
    leaves = [t if t is None else t.requires_grad_(grad.get(name, True))
              for name, t in zip(("x", "bank", "routing", "bias"), make_inputs(case))]
    with native.force_formulation(formulation):
        y = dynamic_conv2d(*leaves, backend="native", **case.geometry)
    return type(y.grad_fn).__name__


def test_small_grouped_layers_take_autograds_graph():
    # Small B x |W| and the rule's plan grouped for every part (CASES[0], the depthwise case):
    # the grouped trick's own autograd graph (C++ backward nodes), not the Python Function.
    for case in (CASES[0], CASES[4]):
        assert _case_plan(case, *make_inputs(case)[:2]).graph
        assert _grad_fn_name(case) != "_EagerNativeConvBackward"
        # Only the bias needs a gradient: still a graph.
        assert _grad_fn_name(case, x=False, bank=False, routing=False) is not None
    # Another plan (a 1x1 layer: im2col), or a forced formulation: the native Function, which
    # keeps the small mixed weights.
    assert _grad_fn_name(CASES[1]) == "_EagerNativeConvBackward"
    assert (2, 15) in _saved_shapes(CASES[1].replace(bias=True))
    assert _grad_fn_name(CASES[0], "grouped") == "_EagerNativeConvBackward"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[5]], ids=case_id)
def test_autograds_graph_matches_float64_loop(case, layout):
    # No formulation forced: the rule's plan, through autograd's graph where it is grouped.
    _check_against_reference(case, None, channels_last=layout == "channels_last")


def test_autograds_graph_saves_at_most_the_threshold(monkeypatch):
    case = Case(6, 4, 5, 6, 6, (3, 3), 1, 1, 1, 1, 3, True)
    x = make_inputs(case)[0]
    mixed_bytes = 6 * 5 * 4 * 9 * x.element_size()
    shapes = _saved_shapes(case)
    assert (6 * 5, 4, 3, 3) in shapes  # the trick's mixed weights: B x |W| <= 16 MiB
    # With the floor at 0 (B x |W| > x / 4 here) neither the graph nor the Function saves them.
    monkeypatch.setattr(native, "SAVE_MIXED_MIN_BYTES", 0)
    assert mixed_bytes > x.numel() * x.element_size() / 4
    for shape in _saved_shapes(case):
        assert torch.Size(shape).numel() < 6 * 5 * 4 * 9 or tuple(shape) == tuple(x.shape)


def test_autograds_graph_double_backward():
    case = SAVING_CASE.replace(batch=2)
    leaves = tuple(t.requires_grad_(True) for t in make_inputs(case))
    assert _case_plan(case, *leaves[:2]).graph
    assert torch.autograd.gradgradcheck(
        lambda *t: dynamic_conv2d(*t, backend="native", **case.geometry), leaves, fast_mode=True)


def test_forward_without_gradients_skips_the_autograd_function(monkeypatch):
    # Inference (no_grad, inference_mode, or no input requiring grad) records no graph: the
    # forward runs without autograd.Function.apply and its per-call cost.
    def refuse(*args):
        raise AssertionError("autograd.Function used for a forward without gradients")

    monkeypatch.setattr(native._EagerNativeConv, "apply", refuse)
    for case in (CASES[0], CASES[1]):
        x, bank, routing, bias = make_inputs(case)
        want = reference_dynamic_conv2d(x, bank, routing, bias, **case.geometry)
        got = dynamic_conv2d(x, bank, routing, bias, backend="native", **case.geometry)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            leaves = [t if t is None else t.requires_grad_(True) for t in (x, bank, routing, bias)]
            got = dynamic_conv2d(*leaves, backend="native", **case.geometry)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        with torch.inference_mode():
            got = dynamic_conv2d(x, bank, routing, bias, backend="native", **case.geometry)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
