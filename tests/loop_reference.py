"""The independent float64 reference every backend test compares against (not a test module).

Each sample's kernel is mixed by an explicit sum over the bank, then one ``F.conv2d`` per
sample: no code of the library is involved.
"""

import torch
import torch.nn.functional as F


def reference_dynamic_conv2d(x, bank, routing, bias_bank, stride, padding, dilation, groups):
    """x (B, Cin, H, W), bank (K, Cout, Cin/g, kh, kw), routing (B, K), bias_bank (K, Cout)."""
    outputs = []
    for b in range(x.shape[0]):
        weight = sum(routing[b, k] * bank[k] for k in range(bank.shape[0]))
        bias = None
        if bias_bank is not None:
            bias = sum(routing[b, k] * bias_bank[k] for k in range(bank.shape[0]))
        outputs.append(F.conv2d(x[b : b + 1], weight, bias, stride, padding, dilation, groups))
    return torch.cat(outputs)
