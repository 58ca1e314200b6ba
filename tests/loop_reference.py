"""The independent float64 reference every backend test compares against (not a test module),
and the inputs of the case tuples the backend tests share.

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


# A case: (batch, cin, cout, H, W, (kh, kw), stride, padding, dilation, groups, K, bias).


def case_id(case) -> str:
    b, cin, cout, h, w, k, s, p, d, g, n, bias = case
    return f"B{b}-{cin}to{cout}-{h}x{w}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}-K{n}-bias{int(bias)}"


def case_inputs(case, dtype=torch.float64, seed=0):
    """(x, bank, routing, bias_bank or None, geometry kwargs) of a case, from a seeded generator."""
    b, cin, cout, h, w, k, s, p, d, g, n, bias = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=gen, dtype=dtype)
    bank = (
        torch.randn(n, cout, cin // g, *k, generator=gen, dtype=dtype)
        / (cin // g * k[0] * k[1]) ** 0.5
    )
    routing = torch.softmax(torch.randn(b, n, generator=gen, dtype=dtype), dim=1)
    bias_bank = torch.randn(n, cout, generator=gen, dtype=dtype) if bias else None
    return x, bank, routing, bias_bank, dict(stride=s, padding=p, dilation=d, groups=g)
