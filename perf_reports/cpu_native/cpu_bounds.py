"""What bounds ``auto`` where it loses (second pass): per case, each interleaved with
the static conv's forward+backward (1 thread, CPU time, median of 9 per-round ratios):

- ``mix``: the mixing product (B, K) @ (K, |W|) alone (what the backward recomputes);
- ``impl``: the native forward and backward implementations called directly, no autograd;
- ``auto`` / ``grouped``: ``dynamic_conv2d(..., backend=...)`` forward + ``torch.autograd.grad``.

Run from the repository root: ``python perf_reports/cpu_native/cpu_bounds.py``; its output is
``cpu_bounds_t1_process.txt``.
"""

import torch
import torch.nn.functional as F

from dynconv import dynamic_conv2d
from dynconv.autotune.measure import Timer
from dynconv.backends.native import op

CASES = [(1, 128, 7), (4, 128, 7), (4, 512, 7), (16, 16, 14), (16, 64, 14), (4, 256, 14)]


def main() -> None:
    torch.set_num_threads(1)
    timer = Timer("cpu", "process")
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    for batch, channels, size in CASES:
        experts = 4
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        bank = (torch.randn(experts, channels, channels, 3, 3) * 0.1).requires_grad_()
        bias_bank = (torch.randn(experts, channels) * 0.1).requires_grad_()
        routing = torch.softmax(torch.randn(batch, experts), 1).requires_grad_()
        weight = bank[0].detach().clone().requires_grad_()
        bias = bias_bank[0].detach().clone().requires_grad_()
        leaves = [x, bank, routing, bias_bank]
        detached = [t.detach() for t in leaves]
        grad_out = torch.ones(batch, channels, size, size)
        bank_2d = detached[1].reshape(experts, -1)

        def dynamic(backend, leaves=leaves, x=x, bank=bank, routing=routing, bias_bank=bias_bank):
            def run():
                y = dynamic_conv2d(x, bank, routing, bias_bank, 1, 1, backend=backend)
                return torch.autograd.grad(y, leaves, torch.ones_like(y))
            return run

        def static(x=x, weight=weight, bias=bias):
            y = F.conv2d(x, weight, bias, 1, 1)
            return torch.autograd.grad(y, [x, weight, bias], torch.ones_like(y))

        def impl(detached=detached, grad_out=grad_out):
            op.forward_impl(*detached, *geometry)
            return op.backward_impl(grad_out, *detached, *geometry, [True] * 4)

        def mix(routing=detached[2], bank_2d=bank_2d):
            return routing @ bank_2d

        plan = op._plan(detached[0], detached[1], *geometry)
        cells = []
        for name, fn in [("mix", mix), ("impl", impl), ("auto", dynamic("auto")),
                         ("grouped", dynamic("grouped"))]:
            timing = timer.interleaved(fn, static, 9)
            cells.append(f"{name}={timing.ratio:.2f}")
        print(f"B{batch} C{channels} @{size} plan={'/'.join(plan.formulations)} "
              f"chunk={plan.chunk} static={timing.static_ms:.2f}ms " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
