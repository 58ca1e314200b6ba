"""dynconv.train.ablation: the recipes, the expert initialisations and the summary table."""

import math
from dataclasses import asdict, replace

import pytest
import torch

from dynconv import DynamicCNN
from dynconv.train.ablation import (
    RECOMMENDED,
    TODAY,
    VARIANTS,
    init_experts,
    mean_spread,
    run_one,
    summarise,
    write_table,
)


def test_each_variant_changes_one_thing_of_its_base():
    for name, recipe in VARIANTS.items():
        base = RECOMMENDED if "recommended" in name or "uniform" in name else TODAY
        changed = {k for k, v in asdict(recipe).items() if asdict(base)[k] != v}
        if name.startswith("affine"):
            changed.discard("task")
        if name == "recommended":
            assert changed == set()
            assert {k for k, v in asdict(RECOMMENDED).items() if asdict(TODAY)[k] != v} == {
                "router_init", "decay"}
        elif name in ("today", "affine-today", "affine-recommended"):
            assert changed == set(), name
        elif name == "no-anneal":  # a constant T = 1: start and anneal length both change
            assert changed == {"temperature_start", "anneal_epochs"}
        elif "uniform-mix" in name:  # a constant, very high T
            assert changed == {"temperature_start", "temperature_end", "anneal_epochs"}
            assert recipe.temperature_start == recipe.temperature_end >= 1e4
        else:
            assert len(changed) == 1, (name, changed)


@pytest.mark.parametrize("scheme", ["independent", "scaled", "shared"])
def test_expert_initialisations(scheme):
    torch.manual_seed(0)
    model = DynamicCNN(1, 10, num_experts=4, widths=(64, 64, 64))
    init_experts(model, scheme)
    bank = model.stages[1].conv.weight.detach()  # (4, 64, 64, 3, 3)
    one_conv_std = 1 / math.sqrt(3 * 64 * 9)  # kaiming uniform a=sqrt(5): bound 1/sqrt(fan_in)
    flat = bank.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    if scheme == "shared":
        assert float(cosine) > 0.98
    else:
        assert abs(float(cosine)) < 0.05
    expected = one_conv_std * (2 if scheme == "scaled" else 1)  # sqrt(K) = 2
    assert float(bank.std()) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="scheme must be one of"):
        init_experts(model, "orthogonal")


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    runs = [{"variant": "today", "seed": s, "test_acc": acc, "class_bits_stage1": bits,
             "class_bits_stage2": 0.0, "class_bits_stage3": 0.0,
             "entropy_fraction_stage1": 1.0, "entropy_fraction_stage2": 1.0,
             "entropy_fraction_stage3": 1.0, "usage_fraction_stage1": 1.0,
             "usage_fraction_stage2": 1.0, "usage_fraction_stage3": 1.0,
             "expert_distance_stage1": 1.0, "expert_distance_stage2": 1.0,
             "expert_distance_stage3": 1.0}
            for s, acc, bits in ((0, 0.9, 0.1), (1, 0.8, 0.3))]
    runs.append({"variant": "static", "seed": 0, "test_acc": 0.5})
    rows = summarise(runs)
    assert [row["variant"] for row in rows] == ["static", "today"]  # VARIANTS order
    today = rows[1]
    assert today["seeds"] == [0, 1]
    assert today["test_acc"] == pytest.approx((85.0, math.sqrt(50.0)))
    assert today["class_bits_stage1"] == pytest.approx((0.2, math.sqrt(0.02)))
    assert mean_spread([2.0]) == (2.0, 0.0)
    text = write_table(rows, tmp_path / "t.md", tmp_path / "t.csv")
    assert "| static | 1 | 50.00 ± 0.00 | - |" in text
    assert "| today | 2 | 85.00 ± 7.07 |" in text
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header.startswith("variant,seeds,test_acc_mean")


def test_one_short_run_reports_every_metric():
    record = run_one("today", replace(TODAY, epochs=1, anneal_epochs=1, widths=(8, 8, 8)), 0)
    assert record["variant"] == "today" and record["seed"] == 0
    assert 0.1 < record["test_acc"] <= 1
    for stage in (1, 2, 3):
        assert 0 < record[f"entropy_fraction_stage{stage}"] <= 1 + 1e-9
        assert 0 <= record[f"class_bits_stage{stage}"] <= 2 + 1e-9  # at most log2 K
        assert 0 < record[f"expert_distance_stage{stage}"] < 2
    assert len(record["curve"]) == 2  # epoch 0 and epoch 1
    assert len(record["routing_per_class"]) == 3
