"""One layer's forward+backward (torch.autograd.grad of x, the bank, the routing weights and
the bias bank), auto against the grouped trick (and auto with forced chunk sizes), interleaved
in one process: 9 rounds of n steps each, 1 thread, process CPU time; prints min / median ms
per step. Fourth pass: the graph-or-Function choice for the wide small layers and
the chunk sizes of the lean path.

    python step_ab.py B C HW K n [chunk,chunk,...]
"""

import sys
import time

import torch

from dynconv import dynamic_conv2d
from dynconv.backends.native import op as native

torch.set_num_threads(1)
B, C, HW, K, n = (int(v) for v in sys.argv[1:6])
chunks = [int(c) for c in sys.argv[6].split(",")] if len(sys.argv) > 6 else []
x = torch.randn(B, C, HW, HW, requires_grad=True)
bank = (torch.randn(K, C, C, 3, 3) * 0.05).requires_grad_(True)
bias = torch.randn(K, C, requires_grad=True)
a = torch.softmax(torch.randn(B, K), 1).requires_grad_(True)
leaves = [x, bank, a, bias]


def step(backend, chunk=None):
    def run():
        with native.force_formulation(None, chunk):
            y = dynamic_conv2d(x, bank, a, bias, padding=1, backend=backend)
            return torch.autograd.grad(y, leaves, torch.ones_like(y))
    return run


runs = {"auto": step("auto"), "grouped": step("grouped")}
runs.update({f"auto@{c}": step("auto", c) for c in chunks})
for run in runs.values():
    run()
    run()
times = {name: [] for name in runs}
for _ in range(9):
    for name, run in runs.items():
        start = time.process_time()
        for _ in range(n):
            run()
        times[name].append((time.process_time() - start) / n * 1e3)
plan = native._plan(x, bank, [1, 1], [1, 1], [1, 1], 1)
print(B, C, HW, K, "plan", tuple(plan.formulations), "chunk", plan.chunk, "graph", plan.graph,
      " ".join(f"{k} {min(v):.2f}/{sorted(v)[4]:.2f}" for k, v in times.items()))
