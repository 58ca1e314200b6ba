"""What the ``native`` and ``triton`` custom ops share: their definition, fakes and autograd glue.

Both backends register (:func:`define_custom_ops`) a forward op ``(x, weight_bank, routing,
bias_bank, stride, padding, dilation, groups) -> y`` and a backward op that also takes
``grad_out`` (first) and an ``output_mask`` (last) and returns (grad_x, grad_bank,
grad_routing, grad_bias), an unrequested gradient being an empty tensor of its own (outputs of
a custom op may not alias each other).
Autograd saves x, the bank, the routing weights and the bias bank: never the mixed weights.
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


def fake_backward_outputs(x, weight_bank, routing, bias_bank, output_mask):
    """Fake (meta) results of a backward op: contiguous gradients of the requested inputs."""
    need_x, need_bank, need_routing, need_bias = output_mask

    def like(t, needed):
        if not needed or t is None:
            return x.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        like(weight_bank, need_bank),
        like(routing, need_routing),
        like(bias_bank, need_bias),
    )


def _setup_context(ctx, inputs, output):
    x, weight_bank, routing, bias_bank, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight_bank, routing, bias_bank)
    ctx.geometry = (stride, padding, dilation, groups)


def backward_through(backward_op, ctx, grad_out, extra_inputs: int = 0):
    """The gradients of a forward whose first four inputs are (x, weight_bank, routing,
    bias_bank), then stride, padding, dilation, groups and ``extra_inputs`` more non-tensor
    inputs. Saved tensors past the first four are passed on to ``backward_op`` after the mask."""
    x, weight_bank, routing, bias_bank, *saved_extras = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    needed = mask[:3] + [mask[3] and bias_bank is not None]
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, a Hessian-vector product): the gradients must
        # themselves be differentiable, which the backward op is not.
        grads = differentiable_backward(grad_out, (x, weight_bank, routing, bias_bank),
                                        ctx.geometry, needed)
    else:
        grads = backward_op(grad_out, x, weight_bank, routing, bias_bank, *ctx.geometry, mask,
                            *saved_extras)
    return (tuple(g if need else None for g, need in zip(grads, needed))
            + (None,) * (4 + extra_inputs))


def differentiable_backward(grad_out, inputs, geometry, needed) -> list:
    """The gradients of (x, weight_bank, routing, bias_bank) marked in ``needed``, computed with
    plain autograd through the grouped-conv formulation, so that they can be differentiated
    again. Used only when grad mode is on during backward; it materialises the B x |W| mixed
    weights, as the grouped trick does, and its cost is that of a double backward.
    """
    stride, padding, dilation, groups = geometry
    with torch.enable_grad():
        y = grouped_dynamic_conv2d(
            *inputs, ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), groups)
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
    ) -> torch.Tensor:
        return forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation, groups)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward_impl(grad_out, x, weight_bank, routing, bias_bank, stride, padding,
                             dilation, groups, output_mask)

    forward_op = torch.library.custom_op(f"dynconv::{backend}_forward", forward, mutates_args=())
    backward_op = torch.library.custom_op(f"dynconv::{backend}_backward", backward,
                                          mutates_args=())
    forward_op.register_fake(
        lambda x, weight_bank, routing, bias_bank, stride, padding, dilation, groups:
        forward_output(x, weight_bank, stride, padding, dilation)
    )
    backward_op.register_fake(
        lambda grad_out, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups,
        output_mask: fake_backward_outputs(x, weight_bank, routing, bias_bank, output_mask)
    )
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

    def forward(ctx, x, weight_bank, routing, bias_bank, stride, padding, dilation, groups):
        _setup_context(ctx, (x, weight_bank, routing, bias_bank, stride, padding, dilation,
                             groups), None)
        return forward_impl(x, weight_bank, routing, bias_bank, stride, padding, dilation,
                            groups)

    def backward(ctx, grad_out):
        return backward_through(backward_impl, ctx, grad_out)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })


def call_forward(forward_op, x, weight_bank, routing, bias_bank, geometry: ConvGeometry):
    """Dispatch entry point of a backend: x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    return forward_op(
        x, weight_bank, routing, bias_bank, list(geometry.stride), list(geometry.padding),
        list(geometry.dilation), geometry.groups,
    )
