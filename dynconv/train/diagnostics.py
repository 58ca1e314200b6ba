"""What a trained DynamicCNN's routing follows, measured on the test images.

- :func:`variance_explained`: per dynamic stage, the share of the routing's variance (the K
  routing weights of every test image, all K dimensions together) that a linear regression on a
  property of the image explains (R², 0 to 1): its class (one-hot, so this is the between-class
  share of the variance), its brightness (mean pixel) and contrast (pixel standard deviation),
  both together, and on ``digits-affine`` each transform parameter alone (rotation, the two
  scales, shear, the two shifts) and all six together. A linear R² misses a dependence that is
  not linear in the property (one on the rotation's magnitude only, say).
- :func:`mean_routing_accuracy`: the test accuracy when each image's routing is replaced by the
  mean routing of its evaluation batch, in every dynamic stage or in one: what the model loses
  without input-dependent routing, with everything else (experts, BatchNorm, head) as trained.

For an ODConv model (``DynamicCNN(conv="odconv")``) the routing is ODConv's kernel attention (the
softmax over the K experts, ``ODConvAttention.routing``): the R² and the mean-routing accuracies
are of that attention alone, comparable with a DynamicConv2d model's; ODConv's three other
attentions (input channels, output channels, taps) stay per image. ``mean_attention_acc`` is the
accuracy with all four attentions of every stage replaced by their batch means (ODConv only).

Unlike I(class; expert) (the information about the class in one expert drawn from an image's
routing weights, which stays small in bits when the weights are soft), the R² by class says how
much of the differences between images' routings goes with their class.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dynconv.modules import ODConvAttention, ODConvRouter
from dynconv.routing import RoutingMLP


def _routers(model: nn.Module) -> list[nn.Module]:
    """The model's routers, in module order: RoutingMLP (DynamicConv2d's) and ODConvRouter."""
    return [module for module in model.modules()
            if isinstance(module, (RoutingMLP, ODConvRouter))]


def _batch_mean(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.mean(dim=0, keepdim=True).expand_as(t)


@torch.no_grad()
def collect_routing(model: nn.Module, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per dynamic stage, the (N, K) routing weights of the images ``x`` in eval mode (float64,
    on the CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(x), batch_size):
        _, routings = model(x[start : start + batch_size].to(device), return_routing=True)
        parts.append([r.detach().to("cpu", torch.float64) for r in routings])
    model.train(was_training)
    return [torch.cat(stage) for stage in zip(*parts, strict=True)]


def r_squared(target: torch.Tensor, features: torch.Tensor) -> float:
    """R² of the least-squares fit of ``target`` (N, D) by ``features`` (N, F) plus an
    intercept: 1 - (residual sum of squares) / (sum of squares about the mean), summed over the
    D outputs. 0 when the target does not vary."""
    target = target.to(torch.float64)
    features = features.to(torch.float64).reshape(len(target), -1)
    centred = target - target.mean(dim=0)
    total = float((centred**2).sum())
    if total <= 0:
        return 0.0
    design = torch.cat([torch.ones(len(target), 1, dtype=torch.float64),
                        features - features.mean(dim=0)], dim=1)
    solution = torch.linalg.lstsq(design, centred, driver="gelsd").solution
    residual = float(((centred - design @ solution) ** 2).sum())
    return max(0.0, 1.0 - residual / total)


def image_statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image of ``x`` (N, C, H, W): brightness (mean pixel) and contrast (pixel std)."""
    flat = x.flatten(1).to(torch.float64)
    return {"brightness": flat.mean(dim=1), "contrast": flat.std(dim=1)}


def explanatory_variables(data) -> dict[str, torch.Tensor]:
    """The (N, F) regressors of :func:`variance_explained` for ``data``'s test images, by name."""
    labels = data.test_y.cpu()
    stats = image_statistics(data.test_x.cpu())
    variables = {
        "class": torch.nn.functional.one_hot(labels, data.num_classes).to(torch.float64),
        "brightness": stats["brightness"].unsqueeze(1),
        "contrast": stats["contrast"].unsqueeze(1),
        "brightness_contrast": torch.stack([stats["brightness"], stats["contrast"]], dim=1),
    }
    if data.test_factors is not None:
        factors = {name: values.to(torch.float64) for name, values in data.test_factors.items()}
        for name, values in factors.items():
            variables[name] = values.unsqueeze(1)
        variables["all_transforms"] = torch.stack(list(factors.values()), dim=1)
    return variables


def variance_explained(routings: list[torch.Tensor], data) -> dict[str, float]:
    """``r2_<variable>_stage<s>`` for every variable of :func:`explanatory_variables` and stage."""
    result = {}
    for name, features in explanatory_variables(data).items():
        for stage, routing in enumerate(routings, start=1):
            result[f"r2_{name}_stage{stage}"] = r_squared(routing, features)
    return result


@contextmanager
def mean_routing(model: nn.Module, stages: list[int] | None = None,
                 attentions: str = "kernel"):
    """Inside the context, the routers of the given dynamic stages (1-based; None = all) return,
    for every image, the mean of their routing over the batch. An ODConvRouter's kernel
    attention is replaced (``attentions="kernel"``), or all four of its attentions
    (``attentions="all"``); a RoutingMLP has only the one."""
    if attentions not in ("kernel", "all"):
        raise ValueError(f"attentions must be 'kernel' or 'all', got {attentions!r}")
    routers = _routers(model)
    chosen = range(1, len(routers) + 1) if stages is None else stages

    def to_mean(module, args, output):
        if isinstance(output, ODConvAttention):
            if attentions == "all":
                return ODConvAttention(*(_batch_mean(t) for t in output))
            return output._replace(routing=_batch_mean(output.routing))
        return _batch_mean(output)

    handles = [routers[s - 1].register_forward_hook(to_mean) for s in chosen]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy of ``model`` in eval mode, in batches of ``batch_size`` (in order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def mean_routing_accuracy(model: nn.Module, data, batch_size: int) -> dict[str, float]:
    """``mean_routing_acc`` (every stage's routing replaced by its batch mean) and
    ``mean_routing_acc_stage<s>`` (only stage s's), on the test images in batches of
    ``batch_size``; for an ODConv model also ``mean_attention_acc`` (all four attentions of
    every stage replaced)."""
    x, y = data.test_x, data.test_y
    result = {}
    with mean_routing(model):
        result["mean_routing_acc"] = accuracy(model, x, y, batch_size)
    if any(isinstance(router, ODConvRouter) for router in _routers(model)):
        with mean_routing(model, attentions="all"):
            result["mean_attention_acc"] = accuracy(model, x, y, batch_size)
    for stage in range(1, len(_routers(model)) + 1):
        with mean_routing(model, [stage]):
            result[f"mean_routing_acc_stage{stage}"] = accuracy(model, x, y, batch_size)
    return result


def routing_diagnostics(model: nn.Module, data, batch_size: int = 256) -> dict[str, float]:
    """Everything above for a trained dynamic ``model`` (its BatchNorm statistics as they are)."""
    routings = collect_routing(model, data.test_x, batch_size)
    return {**variance_explained(routings, data), **mean_routing_accuracy(model, data, batch_size)}
