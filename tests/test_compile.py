"""torch.compile(fullgraph=True, dynamic=True) of DynamicCNN on CPU (the "auto" -> native op)."""

import torch
from torch._dynamo.testing import CompileCounter

from dynconv import DynamicCNN, set_temperature


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_compiled_cnn_matches_eager_over_two_batch_sizes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = DynamicCNN(num_experts=3, widths=(8, 16, 16), stem_channels=8)
    compiled_model = DynamicCNN(num_experts=3, widths=(8, 16, 16), stem_channels=8)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True)
    for batch in (4, 6):
        x = torch.randn(batch, 3, 16, 16)
        for model in (eager, compiled_model):
            model.zero_grad()
        want = eager(x)
        got = compiled(x)
        # Inductor fuses and reorders fp32 reductions (BN, pooling): results agree to ~1e-6
        # relative, not bit for bit.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        want.square().sum().backward()
        got.square().sum().backward()
        want_grads, got_grads = _grads(eager), _grads(compiled_model)
        for name in want_grads:
            torch.testing.assert_close(
                got_grads[name], want_grads[name], rtol=1e-3, atol=1e-4, msg=name
            )


def test_no_recompile_for_new_batch_size_or_temperature():
    torch._dynamo.reset()
    counter = CompileCounter()
    model = DynamicCNN(num_experts=2, widths=(8, 8, 8), stem_channels=4)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiled(torch.randn(2, 3, 16, 16))
    set_temperature(model, 5.0)
    compiled(torch.randn(3, 3, 16, 16))
    set_temperature(model, 2.0)
    compiled(torch.randn(5, 3, 16, 16)).sum().backward()
    assert counter.frame_count == 1
