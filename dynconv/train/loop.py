"""One model's training run for ``dynconv.train``: epochs, evaluation and routing statistics.

Every rank trains on its :class:`~torch.utils.data.distributed.DistributedSampler` shard (one
shard of everything in a single process) and evaluates its own slice of the test set; loss,
accuracy and routing sums are reduced across ranks, so every rank returns the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from dynconv.optim import param_groups
from dynconv.schedule import TemperatureSchedule

from .dist import DistContext, all_reduce_sum, broadcast_buffers


@dataclass
class Evaluation:
    """Test-set metrics; the routing fields are empty for a static model.

    entropy: per dynamic stage, the mean over test images of the routing entropy
        ``H(a) = -sum_k a_k log a_k`` (nats; log K means a uniform mix, 0 a one-hot choice).
    usage_entropy: per stage, the entropy of the routing averaged over all test images (low when
        every image picks the same experts, log K when the experts are used evenly overall).
    routing_per_class: per stage, a (num_classes, K) tensor of mean routing weights per class.
    class_information: per stage, the mutual information I(class; expert) in nats between a test
        image's class and an expert drawn from its routing weights: usage entropy minus the
        class-weighted entropy of the per-class mean routing (0 when every class is routed
        alike, at most min(log K, log num_classes)).
    """

    loss: float
    accuracy: float
    entropy: list[float] = field(default_factory=list)
    usage_entropy: list[float] = field(default_factory=list)
    routing_per_class: list[torch.Tensor] = field(default_factory=list)
    class_information: list[float] = field(default_factory=list)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last axis."""
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)


def make_train_loader(x: torch.Tensor, y: torch.Tensor, batch_per_rank: int, ctx: DistContext,
                      seed: int) -> DataLoader:
    """A loader over this rank's shard of a seeded shuffle (the same shuffle for any world size)."""
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    return DataLoader(sampler.dataset, batch_size=batch_per_rank, sampler=sampler)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: DistContext,
             num_classes: int, batch_size: int, dynamic: bool) -> Evaluation:
    """Loss, accuracy (and routing statistics if ``dynamic``) over the whole test set.

    ``model`` must be the bare module, not a DDP wrapper: ranks see different numbers of
    batches here, and a DDP forward would wait on collectives the other ranks never join.
    """
    was_training = model.training
    model.eval()
    x, y = x[ctx.rank :: ctx.world_size], y[ctx.rank :: ctx.world_size]
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, correct
    class_count = torch.bincount(y, minlength=num_classes).to(ctx.device, torch.float64)
    entropy_sum = class_routing_sum = None
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(ctx.device)
        yb = y[start : start + batch_size].to(ctx.device)
        if dynamic:
            logits, routings = model(xb, return_routing=True)
            stacked = torch.stack(routings).to(torch.float64)  # (stages, B, K)
            if entropy_sum is None:
                stages, _, experts = stacked.shape
                entropy_sum = torch.zeros(stages, dtype=torch.float64, device=ctx.device)
                class_routing_sum = torch.zeros(stages, num_classes, experts,
                                                dtype=torch.float64, device=ctx.device)
            entropy_sum += _entropy(stacked).sum(dim=1)
            class_routing_sum.index_add_(1, yb, stacked)
        else:
            logits = model(xb)
        sums[0] += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)

    parts = [sums, class_count]
    if dynamic:
        if entropy_sum is None:
            raise ValueError(f"rank {ctx.rank} has no test images to measure routing on")
        parts += [entropy_sum, class_routing_sum.flatten()]
    flat = all_reduce_sum(torch.cat(parts), ctx)
    class_count = flat[2 : 2 + num_classes]
    count = float(class_count.sum())
    result = Evaluation(loss=float(flat[0]) / count, accuracy=float(flat[1]) / count)
    if dynamic:
        offset = 2 + num_classes
        stages = entropy_sum.numel()
        entropy = flat[offset : offset + stages] / count
        per_class_sum = flat[offset + stages :].view_as(class_routing_sum)
        mean_routing = per_class_sum.sum(dim=1) / count  # (stages, K)
        result.entropy = entropy.tolist()
        result.usage_entropy = _entropy(mean_routing).tolist()
        per_class = per_class_sum / class_count.clamp_min(1).view(1, -1, 1)
        result.routing_per_class = [stage.float().cpu() for stage in per_class]
        class_share = class_count / count  # (num_classes,)
        conditional = (_entropy(per_class) * class_share).sum(dim=1)  # (stages,)
        result.class_information = (_entropy(mean_routing) - conditional).tolist()
    return result


@torch.no_grad()
def expert_cosine_distance(model: nn.Module) -> list[float]:
    """Per dynamic layer of ``model`` (DynamicConv2d or ODConv2d, in module order), the mean over
    expert pairs i < j of ``1 - cos(bank[i], bank[j])``, each expert flattened: 0 for identical
    experts, about 1 for unrelated (orthogonal) ones. Layers with one expert give NaN."""
    from dynconv.modules import DynamicConv2d, ODConv2d

    distances = []
    for module in model.modules():
        if not isinstance(module, (DynamicConv2d, ODConv2d)):
            continue
        bank = module.weight.detach().flatten(1).to(torch.float64)
        experts = bank.shape[0]
        if experts < 2:
            distances.append(math.nan)
            continue
        unit = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cosine = unit @ unit.T
        pairs = torch.triu_indices(experts, experts, offset=1)
        distances.append(float((1 - cosine[pairs[0], pairs[1]]).mean()))
    return distances


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, ctx: DistContext,
                          batch_size: int) -> None:
    """Recompute every BatchNorm's running statistics as the average of the batch statistics
    over this rank's shard of ``x`` (training images) under the current weights, in batches of
    ``batch_size``, then share rank 0's.

    Training only ever uses batch statistics; the running ones are for evaluation, and with
    momentum 0.1 they trail the weights by tens of steps, which after one short epoch makes a
    network look untrained in eval mode. This is ``torch.optim.swa_utils.update_bn``.
    """
    shard = x[ctx.rank :: ctx.world_size]
    batches = [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]
    update_bn(batches, model, device=ctx.device)
    broadcast_buffers(model, ctx)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                lr_schedule, temperature_schedule: TemperatureSchedule | None,
                schedule_target: nn.Module, ctx: DistContext,
                progress) -> tuple[float, float, float]:
    """One pass over this rank's shard; returns (mean loss, accuracy, seconds), all ranks reduced.

    ``model`` is what is trained (possibly DDP-wrapped); ``schedule_target`` is the bare module
    whose routers the temperature schedule sets after every optimiser step; ``progress`` wraps
    the loader (a tqdm factory, or ``iter``-like identity).
    """
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
    _synchronize(ctx.device)
    start = time.perf_counter()
    bar = progress(loader)
    for xb, yb in bar:
        xb, yb = xb.to(ctx.device, non_blocking=True), yb.to(ctx.device, non_blocking=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if temperature_schedule is not None:
            temperature_schedule.step(schedule_target)
        with torch.no_grad():
            sums[0] += loss.detach().double() * yb.numel()
            sums[1] += (logits.argmax(dim=1) == yb).sum()
            sums[2] += yb.numel()
        if hasattr(bar, "set_postfix") and not getattr(bar, "disable", True):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    _synchronize(ctx.device)
    seconds = time.perf_counter() - start
    all_reduce_sum(sums, ctx)
    count = float(sums[2])
    if not math.isfinite(float(sums[0])):
        raise FloatingPointError("the training loss diverged to a non-finite value: lower --lr")
    return float(sums[0]) / count, float(sums[1]) / count, seconds


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation settings shared by every model of a run."""

    epochs: int
    batch_size: int  # global: split evenly over the ranks
    optimizer: str  # "sgd" or "adamw"
    lr: float
    weight_decay: float
    momentum: float
    temperature_start: float
    temperature_end: float
    anneal_epochs: int
    seed: int
    # "kernels": weight decay by dynconv.param_groups (none on 1-D parameters, bias banks and
    # routers); "all": on every parameter.
    decay: str = "kernels"
    eval_batch_size: int = 256
    # Evaluate before training, after every eval_every-th epoch and after the last one.
    eval_every: int = 1


DECAY_CHOICES = ("kernels", "all")


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimiser over ``model``'s parameters, weight decay as ``config.decay`` says."""
    if config.decay == "kernels":
        parameters = param_groups(model, config.weight_decay)
    elif config.decay == "all":
        parameters = [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    else:
        raise ValueError(f"decay must be one of {DECAY_CHOICES}, got {config.decay!r}")
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                               nesterov=config.momentum > 0)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")


@dataclass
class FitResult:
    """What one model's run produced: a metrics row per epoch (epoch 0 = before training)."""

    rows: list[dict]
    final: Evaluation
    epoch_seconds: list[float]


def fit(name: str, backend: str, model: nn.Module, data, config: TrainConfig, ctx: DistContext,
        dynamic: bool, progress_factory, log) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs; evaluate before training and after each epoch.

    The learning rate follows a per-step cosine schedule to 0; for a dynamic model the router
    temperature is annealed linearly per step from ``temperature_start`` to ``temperature_end``
    over the first ``anneal_epochs`` epochs, then held. Before every evaluation the BatchNorm
    running statistics are recomputed on the training images (:func:`recalibrate_batchnorm`).
    The test set is evaluated before training, after every ``config.eval_every``-th epoch and
    after the last (one metrics row each; evaluation draws no random numbers, so it does not
    change the training). ``log`` receives one line per evaluated epoch.
    """
    model.to(ctx.device)
    trained = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    batch_per_rank = config.batch_size // ctx.world_size
    loader = make_train_loader(data.train_x, data.train_y, batch_per_rank, ctx, config.seed)
    steps_per_epoch = len(loader)
    optimizer = make_optimizer(config, model)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch)
    temperature = None
    if dynamic:
        temperature = TemperatureSchedule(config.temperature_start, config.temperature_end,
                                          steps=config.anneal_epochs * steps_per_epoch)
        temperature.apply(model)

    def evaluate_row(epoch, train_loss, train_acc, seconds, lr):
        recalibrate_batchnorm(model, data.train_x, ctx, config.eval_batch_size)
        ev = evaluate(model, data.test_x, data.test_y, ctx, data.num_classes,
                      config.eval_batch_size, dynamic)
        row = {"model": name, "backend": backend, "seed": config.seed, "epoch": epoch,
               "temperature": temperature.temperature if dynamic else math.nan,
               "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": ev.loss, "test_acc": ev.accuracy, "epoch_seconds": seconds}
        if dynamic:
            stages = zip(ev.entropy, ev.usage_entropy, ev.class_information,
                         expert_cosine_distance(model), strict=True)
            for stage, (h, usage, information, distance) in enumerate(stages, start=1):
                row[f"entropy_stage{stage}"] = h
                row[f"usage_entropy_stage{stage}"] = usage
                row[f"class_information_stage{stage}"] = information
                row[f"expert_distance_stage{stage}"] = distance
        return row, ev

    row, final = evaluate_row(0, math.nan, math.nan, math.nan, optimizer.param_groups[0]["lr"])
    rows, seconds_per_epoch = [row], []
    for epoch in range(1, config.epochs + 1):
        loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        progress = progress_factory(f"{name} [{backend}] {epoch}/{config.epochs}")
        train_loss, train_acc, seconds = train_epoch(
            trained, loader, optimizer, lr_schedule, temperature, model, ctx, progress)
        seconds_per_epoch.append(seconds)
        if epoch % config.eval_every and epoch != config.epochs:
            continue
        row, final = evaluate_row(epoch, train_loss, train_acc, seconds, lr)
        rows.append(row)
        text = (f"{name} [{backend}] epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} "
                f"acc {train_acc:.4f} | test loss {final.loss:.4f} acc {final.accuracy:.4f} | "
                f"{seconds:.2f} s")
        if dynamic:
            text += f" | T {row['temperature']:.2f} | routing entropy " + " ".join(
                f"{h:.3f}" for h in final.entropy)
        log(text)
    return FitResult(rows=rows, final=final, epoch_seconds=seconds_per_epoch)
