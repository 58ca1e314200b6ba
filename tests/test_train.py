"""dynconv.train: the digits training demo (single process, 2-process gloo, argument errors)."""

import csv
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynconv import DynamicCNN, DynamicConv2d, ODConv2d
from dynconv.train import main
from dynconv.train.data import (
    AFFINE_TEST_COPIES,
    FACTORS,
    MAX_ROTATION_DEGREES,
    NUM_CLASSES,
    TASKS,
    TEST_SIZE,
    dataset_definition,
    load_digits_split,
)
from dynconv.train.dist import DistContext
from dynconv.train.loop import (
    TrainConfig,
    evaluate,
    expert_cosine_distance,
    fit,
    make_optimizer,
    recalibrate_batchnorm,
)
from dynconv.train.models import (
    StaticCNN,
    count_multiply_adds,
    count_parameters,
)

ARTIFACTS = {"checkpoint.pt", "metrics.csv", "routing_per_class.csv", "results.md",
             "accuracy.png", "routing_per_class_auto.png", "routing_entropy_auto.png"}
# Small but long enough to learn: 15 steps per epoch, 3 epochs.
SHORT_RUN = ["--epochs", "3", "--train-subset", "480", "--batch-size", "32", "--threads", "1",
             "--no-progress", "--seeds", "1"]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_digits_split_is_fixed_and_normalised():
    first, second = load_digits_split(32), load_digits_split(32, train_subset=100)
    assert first.train_x.shape == (1797 - TEST_SIZE, 1, 32, 32)
    assert first.test_x.shape == (TEST_SIZE, 1, 32, 32)
    assert torch.equal(first.test_y, second.test_y)
    assert torch.equal(first.train_y[:100], second.train_y)
    assert sorted(first.test_y.unique().tolist()) == list(range(NUM_CLASSES))
    assert abs(float(first.train_x.mean())) < 1e-4
    assert abs(float(first.train_x.std()) - 1) < 1e-4


@pytest.mark.parametrize("bad", [0, 1438, True])
def test_digits_subset_out_of_range(bad):
    with pytest.raises(ValueError, match="train_subset"):
        load_digits_split(32, train_subset=bad)


def test_affine_digits_are_fixed_distorted_and_normalised():
    clean, hard = load_digits_split(16), load_digits_split(16, task="digits-affine")
    again = load_digits_split(16, task="digits-affine")
    assert torch.equal(hard.train_x, again.train_x) and torch.equal(hard.test_x, again.test_x)
    assert torch.equal(hard.train_y, clean.train_y)
    # The test set: AFFINE_TEST_COPIES differently distorted copies of every test digit.
    assert torch.equal(hard.test_y, clean.test_y.repeat(AFFINE_TEST_COPIES))
    assert hard.test_x.shape == (AFFINE_TEST_COPIES * TEST_SIZE, 1, 16, 16)
    assert clean.test_factors is None and set(hard.test_factors) == set(FACTORS)
    for values in hard.test_factors.values():
        assert values.shape == (AFFINE_TEST_COPIES * TEST_SIZE,)
    assert float(hard.test_factors["rotation_deg"].abs().max()) <= MAX_ROTATION_DEGREES
    copies = hard.test_x.view(AFFINE_TEST_COPIES, TEST_SIZE, -1)
    assert float((copies[0] - copies[1]).norm(dim=1).min()) > 0.3 * float(
        copies[0].norm(dim=1).mean())
    # Copy c > 0 is its own draw: a rotation list that is not copy 0's.
    rotations = hard.test_factors["rotation_deg"].view(AFFINE_TEST_COPIES, TEST_SIZE)
    assert not torch.allclose(rotations[0], rotations[1])
    assert hard.train_x.shape == clean.train_x.shape
    definition = dataset_definition("digits-affine", 16)
    assert definition["test_copies"] == AFFINE_TEST_COPIES and definition["image_size"] == 16
    assert "test_copies" not in dataset_definition("digits")
    assert abs(float(hard.train_x.mean())) < 1e-4
    assert abs(float(hard.train_x.std()) - 1) < 1e-4
    # Every image is moved: no distorted image is close to its clean original.
    difference = (hard.train_x - clean.train_x).flatten(1).norm(dim=1)
    assert float(difference.min()) > 0.3 * float(clean.train_x.flatten(1).norm(dim=1).mean())
    with pytest.raises(ValueError, match="task must be one of"):
        load_digits_split(16, task="mnist")
    assert TASKS == ("digits", "digits-affine")


def test_expert_cosine_distance():
    conv = DynamicConv2d(2, 3, 1, num_experts=3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0] = 1.0
        conv.weight[1, 0, 0] = 2.0  # parallel to expert 0: distance 0
        conv.weight[2, 0, 1] = 1.0  # orthogonal to both: distance 1
    assert expert_cosine_distance(nn.Sequential(conv)) == [pytest.approx(2 / 3)]
    assert expert_cosine_distance(DynamicConv2d(2, 3, 1, num_experts=1)) != [0.0]


def test_evaluation_class_information_is_the_mutual_information():
    """Two classes routed to two different experts: I(class; expert) = H(class) = log 2; routed
    alike: 0."""
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    class Fixed(nn.Module):
        def __init__(self, split):
            super().__init__()
            self.split = split

        def forward(self, x, return_routing=False):
            label = x[:, 0, 0, 0].long()
            routing = (torch.nn.functional.one_hot(label, 2).float() if self.split
                       else torch.full((len(x), 2), 0.5))
            return torch.nn.functional.one_hot(label, 2).float(), [routing]

    x = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(4, 1, 1, 1)
    y = x.view(-1).long()
    split = evaluate(Fixed(True), x, y, ctx, num_classes=2, batch_size=3, dynamic=True)
    assert split.class_information == [pytest.approx(math.log(2))]
    assert split.entropy == [pytest.approx(0.0, abs=1e-9)]
    alike = evaluate(Fixed(False), x, y, ctx, num_classes=2, batch_size=3, dynamic=True)
    assert alike.class_information == [pytest.approx(0.0, abs=1e-12)]


def test_recalibrated_batchnorm_holds_the_training_statistics():
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    x = 3 + 2 * torch.randn(50, 1, 8, 8)
    recalibrate_batchnorm(model, x, ctx, batch_size=7)
    with torch.no_grad():  # the average of the 8 batches' means (update_bn's cumulative mean)
        batch_means = [model[0](x[i : i + 7]).mean(dim=(0, 2, 3)) for i in range(0, 50, 7)]
    torch.testing.assert_close(model[1].running_mean, torch.stack(batch_means).mean(0))
    assert model[1].momentum == 0.1 and model.training


def test_evaluating_less_often_leaves_the_training_unchanged():
    """fit evaluates every eval_every epochs and after the last; evaluation (BatchNorm
    recalibration included) draws no randomness, so the final numbers do not depend on it."""
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = load_digits_split(16, train_subset=96)
    finals = {}
    for every in (1, 2):
        config = TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=2e-3,
                             weight_decay=0.05, momentum=0.9, temperature_start=30,
                             temperature_end=1, anneal_epochs=1, seed=0, eval_every=every)
        torch.manual_seed(0)
        model = DynamicCNN(1, 10, num_experts=2, widths=(8, 8, 8))
        result = fit("d", "auto", model, data, config, ctx, True, lambda d: (lambda x: x),
                     lambda text: None)
        assert [row["epoch"] for row in result.rows] == ([0, 1, 2, 3] if every == 1
                                                         else [0, 2, 3])
        assert len(result.epoch_seconds) == 3
        finals[every] = result.rows[-1]
    for key in ("test_acc", "test_loss", "train_loss", "entropy_stage3"):
        assert finals[1][key] == finals[2][key], key


@pytest.mark.parametrize("decay", ["kernels", "all"])
def test_optimizer_weight_decay_groups(decay):
    model = DynamicCNN(1, 10, num_experts=2, widths=(4, 4, 4))
    config = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                         momentum=0.9, temperature_start=30, temperature_end=1, anneal_epochs=1,
                         seed=0, decay=decay)
    optimizer = make_optimizer(config, model)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    router = model.stages[0].conv.router
    assert (id(router.fc2.weight) in decayed) == (decay == "all")
    assert id(model.stages[0].conv.weight) in decayed
    with pytest.raises(ValueError, match="decay must be one of"):
        make_optimizer(TrainConfig(**{**config.__dict__, "decay": "none"}), model)


def test_one_epoch_smoke_run_is_not_at_chance(tmp_path):
    """One epoch used to leave DynamicCNN at chance in eval mode: BatchNorm running statistics
    trailed the weights. They are recalibrated before every evaluation now."""
    out = tmp_path / "one"
    assert main(["--epochs", "1", "--threads", "1", "--no-progress", "--seeds", "2",
                 "--out", str(out)]) == 0
    rows = _read_csv(out / "metrics.csv")
    assert [(r["model"], r["seed"]) for r in rows if r["epoch"] == "1"] == [
        ("static", "0"), ("DynamicCNN", "0"), ("static", "1"), ("DynamicCNN", "1")]
    for row in rows:
        if row["epoch"] == "1":
            assert float(row["test_acc"]) > 0.5, row
    # The table gives mean +- sample std over the two seeds.
    final = [100 * float(r["test_acc"]) for r in rows
             if r["epoch"] == "1" and r["model"] == "DynamicCNN"]
    mean, std = sum(final) / 2, abs(final[0] - final[1]) / 2 ** 0.5
    assert f"| {mean:.2f} ± {std:.2f}% (2 seeds) |" in (out / "results.md").read_text()


def test_static_twin_mirrors_dynamic_cnn():
    widths = (8, 16, 24)
    static = StaticCNN(1, 10, widths)
    dynamic = DynamicCNN(1, 10, num_experts=3, widths=widths)
    x = torch.randn(2, 1, 20, 20)
    assert static(x).shape == dynamic(x).shape == (2, 10)
    static_convs = [m for m in static.modules() if isinstance(m, torch.nn.Conv2d)]
    dynamic_convs = [dynamic.stem[0]] + [stage.conv for stage in dynamic.stages]
    for s, d in zip(static_convs, dynamic_convs, strict=True):
        assert s.weight.shape == d.weight.shape[-4:]
        assert (s.stride, s.padding, s.bias is None) == (d.stride, d.padding, d.bias is None)
    # Same parameters except the extra K-1 kernels of each bank and the routers.
    extra = sum((d.weight.shape[0] - 1) * d.weight[0].numel()
                + count_parameters(d.router) for d in dynamic_convs[1:])
    assert count_parameters(dynamic) == count_parameters(static) + extra


def test_multiply_adds_match_flop_counter():
    widths = (8, 16, 24)
    x = torch.randn(1, 1, 16, 16)
    static = StaticCNN(1, 10, widths).eval()
    with FlopCounterMode(display=False) as counter:
        static(x)
    assert count_multiply_adds(static, (1, 16, 16)) == counter.get_total_flops() // 2
    # The grouped backend runs the mixing as one matmul and the conv as one grouped conv, both of
    # which the flop counter sees: it must agree with the analytic count, router included.
    dynamic = DynamicCNN(1, 10, num_experts=3, widths=widths, backend="grouped").eval()
    with FlopCounterMode(display=False) as counter:
        dynamic(x)
    assert count_multiply_adds(dynamic, (1, 16, 16)) == counter.get_total_flops() // 2


def test_short_run_writes_artifacts_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SHORT_RUN + ["--out", str(out)]) == 0
    assert ARTIFACTS <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "| static CNN (nn.Conv2d) |" in printed and "| DynamicCNN (K=4) | auto |" in printed

    rows = _read_csv(out / "metrics.csv")
    assert [(r["model"], int(r["epoch"])) for r in rows] == (
        [("static", e) for e in range(4)] + [("DynamicCNN", e) for e in range(4)])
    final = {r["model"]: float(r["test_acc"]) for r in rows if r["epoch"] == "3"}
    assert final["static"] > 0.6 and final["DynamicCNN"] > 0.6, final  # chance is 0.1
    dynamic_rows = [r for r in rows if r["model"] == "DynamicCNN"]
    assert float(dynamic_rows[0]["temperature"]) == pytest.approx(30.0)
    assert float(dynamic_rows[-1]["temperature"]) == pytest.approx(1.0)
    for r in dynamic_rows:
        for stage in (1, 2, 3):
            assert 0 <= float(r[f"entropy_stage{stage}"]) <= torch.log(torch.tensor(4.0)) + 1e-6

    routing = _read_csv(out / "routing_per_class.csv")
    assert len(routing) == 3 * NUM_CLASSES * 4
    for stage in (1, 2, 3):
        for label in range(NUM_CLASSES):
            weights = [float(r["mean_routing"]) for r in routing
                       if r["stage"] == str(stage) and r["class"] == str(label)]
            assert sum(weights) == pytest.approx(1.0, abs=1e-4)

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    StaticCNN(1, 10).load_state_dict(checkpoint["static"])
    DynamicCNN(1, 10).load_state_dict(checkpoint["dynamic"]["auto"])
    assert checkpoint["run"]["epochs"] == 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_run_writes_one_set_of_artifacts(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "dynconv.train", "--epochs", "1", "--train-subset", "128", "--batch-size", "32",
        "--threads", "1", "--no-progress", "--seeds", "1", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es) on cpu" in done.stdout
    assert done.stdout.count("| DynamicCNN (K=4) | auto |") == 1  # only rank 0 prints
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    rows = _read_csv(out / "metrics.csv")
    assert len(rows) == 4  # (static, dynamic) x (epoch 0, epoch 1): not one set per rank

    # Before training, the metrics reduced over the two ranks' halves of the test set must equal
    # one pass over the whole test set with the same seed's initial weights, and BatchNorm
    # statistics recalibrated on rank 0's half of the training images (shared with rank 1).
    data = load_digits_split(32, train_subset=128)
    one_process = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    static = StaticCNN(1, 10)
    torch.manual_seed(0)
    dynamic = DynamicCNN(1, 10, temperature=30.0)
    for model, row in ((static, rows[0]), (dynamic, rows[2])):
        assert row["epoch"] == "0"
        recalibrate_batchnorm(model, data.train_x[0::2], one_process, batch_size=256)
        model.eval()
        with torch.no_grad():
            logits = model(data.test_x)
        expected_loss = float(torch.nn.functional.cross_entropy(logits, data.test_y))
        expected_acc = int((logits.argmax(1) == data.test_y).sum()) / len(data.test_y)
        assert float(row["test_loss"]) == pytest.approx(expected_loss, rel=1e-5)
        assert float(row["test_acc"]) == pytest.approx(expected_acc, abs=1e-9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "argument --epochs: expected an int >= 1, got 0"),
        (["--batch-size", "x"], "argument --batch-size: expected an int >= 1, got 'x'"),
        (["--lr", "-1"], "argument --lr: expected a finite float > 0, got -1.0"),
        (["--momentum", "1.5"], "argument --momentum: expected a float in [0, 1), got 1.5"),
        (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
        (["--epochs", "3", "--anneal-epochs", "4"],
         "argument --anneal-epochs: expected at most --epochs=3, got 4"),
        (["--image-size", "4"], "argument --image-size: expected an int >= 8, got 4"),
        (["--backend", "nope"], "argument --backend: unknown backend 'nope'; expected one of"),
        (["--backend", "loop", "loop"], "argument --backend: expected distinct backends"),
        (["--train-subset", "5000"], "argument --train-subset: train_subset must be an int in"),
        (["--model", "condconv"], "argument --model: invalid choice: 'condconv'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_device_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "argument --device: 'cuda' was asked for but torch sees no CUDA device" in (
        capsys.readouterr().err)


# --model odconv: DynamicCNN(conv="odconv").


def test_dynamic_cnn_conv_option_keeps_the_default_and_builds_odconv():
    torch.manual_seed(0)
    default = DynamicCNN(1, 10, widths=(8, 8, 8))
    torch.manual_seed(0)
    explicit = DynamicCNN(1, 10, widths=(8, 8, 8), conv="dynamic")
    assert default.state_dict().keys() == explicit.state_dict().keys()
    for key, value in default.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[key]), key
    model = DynamicCNN(1, 10, num_experts=3, widths=(8, 8, 8), temperature=5.0, conv="odconv")
    assert all(isinstance(stage.conv, ODConv2d) for stage in model.stages)
    assert model.stages[0].conv.temperature == 5.0
    logits, routings = model(torch.randn(4, 1, 16, 16), return_routing=True)
    assert logits.shape == (4, 10) and [r.shape for r in routings] == [(4, 3)] * 3
    for routing in routings:  # ODConv's kernel attention: a softmax over the experts
        torch.testing.assert_close(routing.sum(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="routing must be None"):
        model.stages[0](torch.randn(2, 16, 8, 8), routing=torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="conv must be one of"):
        DynamicCNN(1, 10, conv="condconv")
    for bad in ({"gate": "sigmoid"}, {"reduction": 2}, {"router_init": "linear"}):
        with pytest.raises(ValueError, match="apply only to conv='dynamic'"):
            DynamicCNN(1, 10, conv="odconv", **bad)


def test_odconv_weight_decay_groups_distance_and_multiply_adds():
    model = DynamicCNN(1, 10, num_experts=2, widths=(4, 4, 4), conv="odconv")
    config = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                         momentum=0.9, temperature_start=30, temperature_end=1, anneal_epochs=1,
                         seed=0, decay="kernels")
    optimizer = make_optimizer(config, model)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    conv = model.stages[0].conv
    assert id(conv.weight) in decayed
    assert not any(id(p) in decayed for p in conv.router.parameters())
    assert len(expert_cosine_distance(model)) == 3
    # Each stage: the conv, the mixing of K kernels and the three attentions' scaling (|W| each).
    x_size, expected = 16, 0
    expected += 16 * 1 * 9 * x_size**2  # the stem
    size, cin = x_size, 16
    for stage in model.stages:
        size = (size + 1) // 2
        w = stage.conv.weight[0].numel()
        linears = sum(m.in_features * m.out_features for m in stage.conv.router.modules()
                      if isinstance(m, nn.Linear))
        expected += w * size**2 + 2 * w + 3 * w + linears
        cin = stage.conv.out_channels
    expected += cin * 10  # the head
    assert count_multiply_adds(model, (1, x_size, x_size)) == expected


def test_short_odconv_run_writes_artifacts(tmp_path):
    out = tmp_path / "odconv"
    assert main(["--model", "odconv", "--epochs", "2", "--train-subset", "128", "--batch-size",
                 "32", "--widths", "8", "8", "8", "--image-size", "16", "--threads", "1",
                 "--no-progress", "--seeds", "1", "--out", str(out)]) == 0
    assert ARTIFACTS <= {p.name for p in out.iterdir()}
    results = (out / "results.md").read_text()
    assert "| DynamicCNN of ODConv2d (K=4) | auto |" in results
    assert "dynamic model of ODConv2d" in results
    rows = [r for r in _read_csv(out / "metrics.csv") if r["model"] == "DynamicCNN"]
    # The schedule reaches ODConv's routers: T 30 at the first step, 1 after the anneal.
    assert float(rows[0]["temperature"]) == pytest.approx(30.0)
    assert float(rows[-1]["temperature"]) == pytest.approx(1.0)
    assert all(0 < float(rows[-1][f"entropy_stage{s}"]) for s in (1, 2, 3))
    routing = _read_csv(out / "routing_per_class.csv")
    weights = [float(r["mean_routing"]) for r in routing if r["stage"] == "1" and r["class"] == "0"]
    assert sum(weights) == pytest.approx(1.0, abs=1e-4)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["run"]["model"] == "odconv"
    DynamicCNN(1, 10, widths=(8, 8, 8), conv="odconv").load_state_dict(
        checkpoint["dynamic"]["auto"])
