"""Time every strategy of the ``triton`` backend on one call, forward and backward: what the
sweep and gpu-check record in the tuned table's ``strategies`` section, timed as benchmark mode
times them (:func:`dynconv.backends.benchmark.time_alternatives`)."""

from __future__ import annotations


def time_call_strategies(x, weight_bank, routing, bias_bank, grad_out, stride, padding,
                         dilation, groups: int, output_mask=(True, True, True, True)) -> dict:
    """{"forward": (key, entry), "backward": (key, entry)}: entry ``{"strategy": the fastest or
    None, "ms": {strategy: median ms or why it failed}}``."""
    from dynconv.backends import benchmark
    from dynconv.backends.triton import backward, forward

    mask = [bool(m) for m in output_mask]
    mask[3] = mask[3] and bias_bank is not None
    found = {}
    for kind, (key, _eligible, runs) in (
            ("forward", forward.strategy_runs(x, weight_bank, routing, bias_bank, stride,
                                              padding, dilation, groups)),
            ("backward", backward.strategy_runs(grad_out, x, weight_bank, routing, bias_bank,
                                                stride, padding, dilation, groups, mask))):
        times = benchmark.time_alternatives(runs, x.device)
        times = {k: round(v, 6) if isinstance(v, float) else v for k, v in times.items()}
        found[kind] = (key, {"strategy": benchmark.fastest(times), "ms": times})
    return found
