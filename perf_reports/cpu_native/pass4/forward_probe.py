"""The no-grad forward, four ways, interleaved in one fresh process (15 rounds of n calls, 1
thread, process CPU time; min / median ms): the trick, auto, auto with a fresh buffer for the
mixed weights instead of the workspace, and the native forward implementation called directly.
Fourth pass.

    python forward_probe.py B C HW K n
"""

import sys
import time

import torch

from dynconv import dynamic_conv2d
from dynconv.backends.native import op as native

torch.set_num_threads(1)
B, C, HW, K, n = (int(v) for v in sys.argv[1:6])
x = torch.randn(B, C, HW, HW, requires_grad=True)
bank = (torch.randn(K, C, C, 3, 3) * 0.05).requires_grad_(True)
bias = torch.randn(K, C, requires_grad=True)
a = torch.softmax(torch.randn(B, K), 1).requires_grad_(True)
workspace_buffer = native._workspace_buffer


def fresh_buffer(chunk, bank_2d, slot=native.MIXED):
    return bank_2d.new_empty((chunk, bank_2d.shape[1]))


def backend(name):
    def run():
        with torch.no_grad():
            return dynamic_conv2d(x, bank, a, bias, padding=1, backend=name)
    return run


def auto_fresh():
    native._workspace_buffer = fresh_buffer
    try:
        return backend("auto")()
    finally:
        native._workspace_buffer = workspace_buffer


def implementation():
    with torch.no_grad():
        return native.forward_impl(x, bank, a, bias, [1, 1], [1, 1], [1, 1], 1)


runs = {"grouped": backend("grouped"), "auto": backend("auto"), "auto_fresh": auto_fresh,
        "impl": implementation}
for run in runs.values():
    run()
    run()
times = {name: [] for name in runs}
for _ in range(15):
    for name, run in runs.items():
        start = time.process_time()
        for _ in range(n):
            run()
        times[name].append((time.process_time() - start) / n * 1e3)
print(B, C, HW, K, " ".join(f"{k} {min(v):.3f}/{sorted(v)[7]:.3f}" for k, v in times.items()))
