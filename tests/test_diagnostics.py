"""dynconv.train.diagnostics: variance explained and the mean-routing ablation."""

import pytest
import torch

from dynconv import DynamicCNN
from dynconv.train.data import DigitsSplit
from dynconv.train.diagnostics import (
    accuracy,
    collect_routing,
    image_statistics,
    mean_routing,
    r_squared,
    routing_diagnostics,
    variance_explained,
)


def test_r_squared():
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(500, 1, generator=generator)
    exact = torch.cat([2 * feature + 1, -feature], dim=1)
    assert r_squared(exact, feature) == pytest.approx(1.0)
    noise = torch.randn(500, 2, generator=generator)
    assert r_squared(noise, feature) < 0.02
    # Half of the variance linear in the feature, half independent noise.
    assert r_squared(feature + noise[:, :1], feature) == pytest.approx(0.5, abs=0.08)
    assert r_squared(torch.ones(10, 3), torch.arange(10.0)) == 0.0
    # One-hot classes: the between-class share of the variance.
    labels = torch.arange(100) % 4
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    target = torch.stack([labels.double(), labels.double() ** 2], dim=1)
    assert r_squared(target, one_hot) == pytest.approx(1.0)


def test_image_statistics():
    x = torch.stack([torch.full((1, 4, 4), 2.0), torch.tensor([0.0, 2.0]).repeat(8).view(1, 4, 4)])
    stats = image_statistics(x)
    assert stats["brightness"].tolist() == pytest.approx([2.0, 1.0])
    assert stats["contrast"].tolist() == pytest.approx([0.0, (16 / 15) ** 0.5])


def _split(count=64, factors=True):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 1, 16, 16, generator=generator)
    x = x * torch.linspace(0.2, 3, count).view(-1, 1, 1, 1)  # contrast varies a lot
    y = torch.arange(count) % 10
    test_factors = ({"rotation_deg": 100 * torch.rand(count, generator=generator) - 50,
                     "shear": torch.rand(count, generator=generator)} if factors else None)
    return DigitsSplit(train_x=x, train_y=y, test_x=x, test_y=y, test_factors=test_factors)


def test_variance_explained_names_every_variable_and_stage():
    data = _split()
    routings = [torch.rand(64, 4), torch.rand(64, 4)]
    result = variance_explained(routings, data)
    names = {"class", "brightness", "contrast", "brightness_contrast", "rotation_deg", "shear",
             "all_transforms"}
    assert set(result) == {f"r2_{n}_stage{s}" for n in names for s in (1, 2)}
    assert all(0 <= value <= 1 for value in result.values())
    # A routing that is a function of the contrast only.
    contrast = image_statistics(data.test_x)["contrast"].float()
    routing = torch.softmax(torch.stack([contrast, -contrast], dim=1) * 0.1, dim=1)
    result = variance_explained([routing], data)
    assert result["r2_contrast_stage1"] > 0.99 and result["r2_rotation_deg_stage1"] < 0.2
    clean = variance_explained([routing], _split(factors=False))
    assert "r2_all_transforms_stage1" not in clean


def test_mean_routing_replaces_each_images_routing_by_the_batch_mean():
    torch.manual_seed(0)
    model = DynamicCNN(1, 10, num_experts=4, widths=(8, 8, 8))
    data = _split()
    before = collect_routing(model, data.test_x, batch_size=64)
    assert float(before[0].std(dim=0).max()) > 1e-4  # the images are routed differently
    with mean_routing(model):
        inside = collect_routing(model, data.test_x, batch_size=32)
    for stage in inside:  # one routing per batch of 32
        assert torch.allclose(stage[:32], stage[:1].expand(32, -1))
        assert torch.allclose(stage[32:], stage[32:33].expand(32, -1))
    torch.testing.assert_close(inside[0][:32].mean(0), before[0][:32].mean(0))
    with mean_routing(model, [2]):
        only_two = collect_routing(model, data.test_x, batch_size=64)
    torch.testing.assert_close(only_two[0], before[0])
    assert float(only_two[1].std(dim=0).max()) < 1e-12
    torch.testing.assert_close(collect_routing(model, data.test_x, 64)[0], before[0])  # removed
    result = routing_diagnostics(model, data, batch_size=16)
    assert set(k for k in result if k.startswith("mean_routing_acc")) == {
        "mean_routing_acc", "mean_routing_acc_stage1", "mean_routing_acc_stage2",
        "mean_routing_acc_stage3"}
    assert accuracy(model, data.test_x, data.test_y, 16) == pytest.approx(
        accuracy(model, data.test_x, data.test_y, 64))


def test_odconv_kernel_attention_and_all_four_attentions_at_the_batch_mean():
    torch.manual_seed(0)
    model = DynamicCNN(1, 10, num_experts=4, widths=(8, 8, 8), conv="odconv")
    data = _split()
    before = collect_routing(model, data.test_x, batch_size=64)  # the kernel attention
    assert len(before) == 3 and float(before[0].std(dim=0).max()) > 1e-4
    seen = []
    hook = model.stages[0].conv.router.register_forward_hook(
        lambda module, args, output: seen.append(output))
    try:
        with mean_routing(model):  # the kernel attention only
            inside = collect_routing(model, data.test_x, batch_size=64)
        with mean_routing(model, attentions="all"):
            collect_routing(model, data.test_x, batch_size=64)
    finally:
        hook.remove()
    assert float(inside[2].std(dim=0).max()) < 1e-12
    torch.testing.assert_close(inside[0][0], before[0].mean(0))
    # The hook above ran before mean_routing's: look at what the conv received instead.
    kernel_only, every = [], []
    for chosen, attentions in ((kernel_only, "kernel"), (every, "all")):
        hook = model.stages[0].conv.register_forward_hook(
            lambda module, args, output, chosen=chosen: chosen.append(output[1]))
        try:
            with mean_routing(model, attentions=attentions):
                model.eval()
                with torch.no_grad():
                    model(data.test_x, return_routing=True)
        finally:
            hook.remove()
    assert float(kernel_only[0].routing.std(dim=0).max()) < 1e-12
    assert float(kernel_only[0].in_scale.std(dim=0).max()) > 1e-6  # still per image
    for scale in every[0]:
        assert float(scale.std(dim=0).max()) < 1e-12
    result = routing_diagnostics(model, data, batch_size=32)
    assert {"mean_routing_acc", "mean_attention_acc", "r2_class_stage3"} <= set(result)
    with pytest.raises(ValueError, match="attentions must be"):
        with mean_routing(model, attentions="taps"):
            pass
