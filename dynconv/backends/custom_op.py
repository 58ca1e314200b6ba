"""What the ``native`` and ``triton`` custom ops share: their definition, fakes and autograd glue.

Both backends register (:func:`define_custom_ops`) a forward op ``(x, weight_bank, routing,
bias_bank, stride, padding, dilation, groups, tap_scale=None) -> y`` and a backward op that also
takes ``grad_out`` (first) and an ``output_mask`` (after groups) and returns (grad_x, grad_bank,
grad_routing, grad_bias, grad_tap_scale), an unrequested gradient being an empty tensor of its
own (outputs of a custom op may not alias each other). ``tap_scale`` (B, kh, kw) is ODConv's
per-sample tap scale of the mixed kernels (both implementations take it as ``tap_scale=``);
with one, the output mask has a fifth entry.
Autograd saves x, the bank, the routing weights, the bias bank and the tap scale: never the
mixed weights.
"""

from __future__ import annotations

import torch

from dynconv.geometry import ConvGeometry, output_hw, output_memory_format

from .reference import grouped_dynamic_conv2d


def forward_output(x, weight_bank, stride, padding, dilation) -> torch.Tensor:
    """An empty y (B, Cout, Ho, Wo) in x's dtype and memory format: the fake result of a
    forward op, and the output buffer a forward fills when it cannot return its result as is."""
    height_out, width_out = output_hw(x.shape[2:], weight_bank.shape[3:], stride, padding, dilation)
    return torch.empty(
        (x.shape[0], weight_bank.shape[1], height_out, width_out), dtype=x.dtype,
        device=x.device, memory_format=output_memory_format(x),
    )


def fake_backward_outputs(x, weight_bank, routing, bias_bank, output_mask, tap_scale=None):
    """Fake (meta) results of a backward op: contiguous gradients of the requested inputs
    (four, and the tap scale's fifth when ``output_mask`` has five entries)."""
    need_x, need_bank, need_routing, need_bias = output_mask[:4]
    need_tap = len(output_mask) > 4 and output_mask[4]

    def like(t, needed):
        if not needed or t is None:
            return x.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        like(weight_bank, need_bank),
        like(routing, need_routing),
        like(bias_bank, need_bias),
    ) + ((like(tap_scale, need_tap),) if len(output_mask) > 4 else ())


# Where the tap scale sits among a forward's inputs (after x, the bank, the routing, the bias
# bank, stride, padding, dilation and groups).
TAP_SCALE_INPUT = 8


def _setup_context(ctx, inputs, output):
    x, weight_bank, routing, bias_bank, stride, padding, dilation, groups = inputs[:8]
    tap_scale = inputs[TAP_SCALE_INPUT] if len(inputs) > TAP_SCALE_INPUT else None
    ctx.save_for_backward(x, weight_bank, routing, bias_bank, tap_scale)
    ctx.geometry = (stride, padding, dilation, groups)


def backward_through(backward_op, ctx, grad_out):
    """The gradients of a forward whose inputs are (x, weight_bank, routing, bias_bank, stride,
    padding, dilation, groups), then optionally the tap scale and more non-tensor inputs, and
    which saved (x, weight_bank, routing, bias_bank, tap_scale or None, *extras): the extras
    are passed on to ``backward_op`` after the mask, the tap scale (if any) as ``tap_scale=``."""
    x, weight_bank, routing, bias_bank, tap_scale, *saved_extras = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    needed = mask[:3] + [mask[3] and bias_bank is not None]
    inputs = (x, weight_bank, routing, bias_bank)
    if tap_scale is not None:
        mask.append(ctx.needs_input_grad[TAP_SCALE_INPUT])
        needed.append(mask[4])
        inputs += (tap_scale,)
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, a Hessian-vector product): the gradients must
        # themselves be differentiable, which the backward op is not.
        grads = differentiable_backward(grad_out, inputs, ctx.geometry, needed)
    else:
        grads = backward_op(grad_out, x, weight_bank, routing, bias_bank, *ctx.geometry, mask,
                            *saved_extras, tap_scale=tap_scale)
    result = [None] * len(ctx.needs_input_grad)
    for index, grad, need in zip((0, 1, 2, 3, TAP_SCALE_INPUT), grads, needed):
        result[index] = grad if need else None
    return tuple(result)


def differentiable_backward(grad_out, inputs, geometry, needed) -> list:
    """The gradients of (x, weight_bank, routing, bias_bank[, tap_scale]) marked in ``needed``,
    computed with plain autograd through the grouped-conv formulation, so that they can be
    differentiated again. Used only when grad mode is on during backward; it materialises the
    B x |W| mixed weights, as the grouped trick does, and its cost is that of a double backward.
    """
    stride, padding, dilation, groups = geometry
    with torch.enable_grad():
        y = grouped_dynamic_conv2d(
            *inputs[:4], ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), groups),
            tap_scale=inputs[4] if len(inputs) > 4 else None,
        )
        wanted = [t for t, need in zip(inputs, needed) if need]
        found = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True,
                                         allow_unused=True))
    grads = []
    for t, need in zip(inputs, needed):
        grad = next(found) if need else None
        grads.append(torch.zeros_like(t) if need and grad is None else grad)
    return grads


def define_custom_ops(backend: str, forward_impl, backward_impl) -> tuple:
    """(forward op, backward op): ``dynconv::<backend>_forward`` / ``_backward`` custom ops that
    call the implementations, with their fakes and the autograd formula registered."""

    def forward(
        x: torch.Tensor,
        weight_bank: torch.Tensor,
        routing: torch.Tensor,
        bias_bank: torch.Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        tap_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                            tap_scale=tap_scale)

    def backward(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight_bank: torch.Tensor,
        routing: torch.Tensor,
        bias_bank: torch.Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        output_mask: list[bool],
        tap_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = backward_impl(grad_out, x, weight_bank, routing, bias_bank, stride, padding,
                              dilation, groups, output_mask, tap_scale=tap_scale)
        return tuple(grads) + (x.new_empty(0),) * (5 - len(grads))

    forward_op = torch.library.custom_op(f"dynconv::{backend}_forward", forward, mutates_args=())
    backward_op = torch.library.custom_op(f"dynconv::{backend}_backward", backward,
                                          mutates_args=())
    forward_op.register_fake(
        lambda x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
        tap_scale=None: forward_output(x, weight_bank, stride, padding, dilation)
    )

    def fake_backward(grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation,
                      groups, output_mask, tap_scale=None):
        grads = fake_backward_outputs(x, weight_bank, routing, bias_bank, output_mask, tap_scale)
        return tuple(grads) + (x.new_empty(0),) * (5 - len(grads))

    backward_op.register_fake(fake_backward)
    register_autograd(forward_op, backward_op)
    return forward_op, backward_op


def register_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable through ``backward_op``."""
    forward_op.register_autograd(
        lambda ctx, grad_out: backward_through(backward_op, ctx, grad_out),
        setup_context=_setup_context,
    )


def eager_autograd_function(name: str, forward_impl, backward_impl) -> type:
    """An autograd.Function with the custom ops' signature, saving and backward, that calls the
    implementations directly: the eager-mode twin of a registered forward/backward op pair.

    Under ``create_graph=True`` its backward (as the custom op's) switches to
    :func:`differentiable_backward`, so that double backward gives the true second derivatives.
    """

    def forward(ctx, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
                tap_scale=None):
        _setup_context(ctx, (x, weight_bank, routing, bias_bank, stride, padding, dilation,
                             groups, tap_scale), None)
        return forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                            groups, tap_scale=tap_scale)

    def backward(ctx, grad_out):
        return backward_through(backward_impl, ctx, grad_out)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })


def call_forward(forward_op, x, weight_bank, routing, bias_bank, geometry: ConvGeometry,
                 tap_scale=None):
    """Dispatch entry point of a backend: x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    return forward_op(
        x, weight_bank, routing, bias_bank, list(geometry.stride), list(geometry.padding),
        list(geometry.dilation), geometry.groups, tap_scale,
    )
