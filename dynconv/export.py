"""ONNX export of models that hold dynamic convolutions: the form each layer is recorded in, the
BatchNorm layers folded into the banks, a dynamic batch.

Under ``torch.onnx.export`` the library's own backends (``auto``, ``native``, ``triton``) are
recorded in one of the standard-ops forms of :data:`FORMS`:

- ``"scan"``: each sample's kernel mixed by one MatMul (routing x bank) for the batch, then one
  ``Conv`` per sample inside an ONNX ``Scan`` over the batch, the weight an input of the Conv:
  the static model's FLOPs plus the mixing.
- ``"spanning"``: one static Conv over the K routing-scaled copies of the input: K x the FLOPs,
  on a constant weight.
- ``"matmul"``: patches by a one-hot depthwise Conv, then a batched MatMul with the mixed kernels.
- ``"auto"`` (:data:`DEFAULT_FORM`): per layer, ``spanning`` for an ungrouped conv whose output
  is a single pixel, ``scan`` everywhere else.

What they cost in onnxruntime against the static model: ``python -m dynconv.autotune onnx``
(perf_reports/onnx/README.md).
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from .backends import registry
from .convert import fuse_conv_bn_eval
from .modules import DynamicConvNd, ODConv2d

FORMS = tuple(registry.ONNX_FORMS)
# What torch.onnx.export records when no form is chosen.
DEFAULT_FORM = registry.ONNX_EXPORT.name


@contextlib.contextmanager
def onnx_export_form(form: str) -> Iterator[str]:
    """Within the block, ``torch.onnx.export`` records the library's dynamic convolutions in
    ``form`` (one of :data:`FORMS`) instead of :data:`DEFAULT_FORM`::

        with dynconv.onnx_export_form("spanning"):
            torch.onnx.export(model, (x,), "model.onnx", dynamo=True, ...)
    """
    token = registry.CHOSEN_ONNX_FORM.set(registry.onnx_form(form))
    try:
        yield form
    finally:
        registry.CHOSEN_ONNX_FORM.reset(token)


def fold_batchnorm(model: nn.Module, args: tuple, kwargs: dict | None = None) -> nn.Module:
    """A copy of ``model`` in which every eval-mode BatchNorm that reads a dynamic conv's (or an
    ODConv2d's) output, and only it, is folded into that conv
    (:func:`dynconv.fuse_conv_bn_eval`) and replaced by ``nn.Identity``. ``model`` itself is left
    as it is.

    Which BatchNorm follows which conv is read from the graph ``torch.export`` records for
    ``model(*args, **kwargs)``: a pair is folded when the BatchNorm's input is the conv's output,
    nothing else reads that output, and each of the two modules runs once per forward. Pairs that
    ``fuse_conv_bn_eval`` refuses (a BatchNorm in training mode, sigmoid gates, for which the
    fold is not exact) are left unfolded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = _as_args(args), kwargs or {}
    model = copy.deepcopy(model)
    calls = _count_calls(model, args, kwargs)
    modules = dict(model.named_modules())
    program = torch.export.export(model, args, kwargs, strict=False)

    def module_path(node: torch.fx.Node) -> str | None:
        """The qualified name of the innermost module whose forward recorded ``node``."""
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None

    pairs = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or len(source.users) != 1:
            continue
        bn_path, conv_path = module_path(node), module_path(source)
        bn, conv = modules.get(bn_path), modules.get(conv_path)
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and isinstance(conv, (DynamicConvNd, ODConv2d))
                and calls[bn] == 1 and calls[conv] == 1):
            pairs.append((conv_path, bn_path))
    for conv_path, bn_path in pairs:
        try:
            fused = fuse_conv_bn_eval(modules[conv_path], modules[bn_path])
        except (TypeError, ValueError):  # not foldable exactly: left as it is
            continue
        _replace(model, conv_path, fused)
        _replace(model, bn_path, nn.Identity())
    return model


def export_onnx(model: nn.Module, args, f=None, *, form: str | None = None,
                fold_bn: bool = True, dynamic_batch: bool = True,
                **export_kwargs) -> torch.onnx.ONNXProgram:
    """Export ``model`` to ONNX (``torch.onnx.export(..., dynamo=True)``) with its dynamic
    convolutions in ``form``, its BatchNorm layers folded, and a dynamic batch.

    Args:
        model: the module to export, in eval mode for deployment; it is not modified.
        args: the example inputs, a tensor or a tuple (each tensor batch first).
        f: where to save the ``.onnx`` file, or None.
        form: one of :data:`FORMS`; None: :data:`DEFAULT_FORM`.
        fold_bn: fold each eval-mode BatchNorm that follows a dynamic conv into its bank
            first (:func:`fold_batchnorm`): the exported graph then has no BatchNormalization
            node there (onnxruntime folds those of static Convs itself, not these).
        dynamic_batch: make dimension 0 of every tensor in ``args`` one dynamic ``batch``
            dimension (at least 1). Ignored when ``export_kwargs`` has ``dynamic_shapes``.
        export_kwargs: passed on to ``torch.onnx.export`` (``verbose`` defaults to False).

    Returns:
        the ``torch.onnx.ONNXProgram`` (``.model_proto``, ``.save(path)``).
    """
    args = _as_args(args)
    form = DEFAULT_FORM if form is None else registry.onnx_form(form).name
    if fold_bn:
        model = fold_batchnorm(model, args, export_kwargs.get("kwargs"))
    if dynamic_batch and "dynamic_shapes" not in export_kwargs:
        batch = torch.export.Dim("batch", min=1)
        export_kwargs["dynamic_shapes"] = tuple(
            {0: batch} if isinstance(arg, torch.Tensor) else None for arg in args)
    export_kwargs.setdefault("verbose", False)
    with onnx_export_form(form):
        return torch.onnx.export(model, args, f, dynamo=True, **export_kwargs)


def _as_args(args) -> tuple:
    return (args,) if isinstance(args, torch.Tensor) else tuple(args)


def _count_calls(model: nn.Module, args: tuple, kwargs: dict) -> collections.Counter:
    """How many times each module runs in one forward of ``model(*args, **kwargs)``."""
    calls = collections.Counter()
    handles = [module.register_forward_pre_hook(lambda module, _: calls.update([module]))
               for module in model.modules()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
