"""One process of the two-version A/B: median forward+backward step (wall clock, 40 steps after
5 warm-up) of ``auto`` and the grouped trick on the small layers where a two-thread regression
of the second pass was suspected. Prints one JSON line.

Run alternately from two checkouts (the dynconv on PYTHONPATH decides the version), e.g.::

    git archive 38d34a2 | (mkdir -p /tmp/ab_old && tar -x -C /tmp/ab_old)
    for i in $(seq 15); do
      PYTHONPATH=/tmp/ab_old python ab_step.py 2 old >> runs.jsonl
      PYTHONPATH=. python perf_reports/cpu_native/ab_pass2_t2/ab_step.py 2 new >> runs.jsonl
    done
"""

import json
import statistics
import sys
import time

import torch

from dynconv.functional import dynamic_conv2d

torch.set_num_threads(int(sys.argv[1]))
tag = sys.argv[2]
# (batch, channels, H = W, experts), 3x3, padding 1, fp32 NCHW
cases = [(16, 128, 7, 4), (4, 128, 7, 4), (128, 64, 8, 4), (16, 64, 14, 4), (16, 16, 14, 4)]
out = {}
for batch, channels, size, experts in cases:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    bank = torch.randn(experts, channels, channels, 3, 3, requires_grad=True)
    routing = torch.softmax(torch.randn(batch, experts), 1).requires_grad_()
    for backend in ("auto", "grouped"):
        def step(x=x, bank=bank, routing=routing, backend=backend):
            y = dynamic_conv2d(x, bank, routing, None, 1, 1, 1, 1, backend=backend)
            y.sum().backward()
        for _ in range(5):
            step()
        times = []
        for _ in range(40):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[f"B{batch} C{channels} @{size} {backend}"] = statistics.median(times) * 1e3
print(json.dumps({"tag": tag, **out}))
