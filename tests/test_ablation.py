"""dynconv.train.ablation: the recipes, the expert initialisations and the summary table."""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from dynconv import DynamicCNN
from dynconv.train.ablation import (
    COMPARISONS,
    QUOTED,
    R2_VARIABLES,
    RECOMMENDED,
    SCHEDULE_VARIANTS,
    SEEDS,
    TODAY,
    VARIANTS,
    check,
    image_bits,
    init_experts,
    interval_half_width,
    mean_spread,
    paired,
    render_all,
    render_reproduction,
    run_one,
    summarise,
    welch,
    write_table,
)
from dynconv.train.data import AFFINE_TEST_COPIES, TEST_SIZE, dataset_definition

ROOT = Path(__file__).resolve().parents[1]
ABLATION = ROOT / "perf_reports" / "training" / "ablation"


def test_each_variant_changes_one_thing_of_its_base():
    for name, recipe in VARIANTS.items():
        on_recommended = any(word in name
                             for word in ("recommended", "uniform", "static", "odconv"))
        base = RECOMMENDED if on_recommended else TODAY
        changed = {k for k, v in asdict(recipe).items() if asdict(base)[k] != v}
        if name.startswith("affine"):
            changed.discard("task")
        if name == "recommended":
            assert changed == set()
            assert {k for k, v in asdict(RECOMMENDED).items() if asdict(TODAY)[k] != v} == {
                "router_init", "decay"}
        elif name in ("today", "affine-today", "affine-recommended"):
            assert changed == set(), name
        elif name.endswith("no-anneal"):  # a constant T = 1: start and anneal length both change
            assert changed == {"temperature_start", "anneal_epochs"}
        elif "uniform-mix" in name:  # a constant, very high T
            assert changed == {"temperature_start", "temperature_end", "anneal_epochs"}
            assert recipe.temperature_start == recipe.temperature_end >= 1e4
        elif name.endswith("static"):  # the twin is trained as the demo trains it
            assert changed == {"model"} and recipe.decay == "kernels"
        elif name.endswith("odconv"):  # the recommended recipe with the ODConv model
            assert changed == {"model"} and recipe.model == "odconv"
        else:
            assert len(changed) == 1, (name, changed)
    assert set(QUOTED) | set(SCHEDULE_VARIANTS) <= set(VARIANTS)
    for _, better, baseline in COMPARISONS:
        assert {better, baseline} <= set(QUOTED) | set(SCHEDULE_VARIANTS)
    assert len(SEEDS) >= 8


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


def _fake_run(variant, seed, acc, bits=0.0):
    recipe = VARIANTS[variant]
    run = {"variant": variant, "seed": seed, "test_acc": acc, "commit": "abc123" * 7,
           "recipe": json.loads(json.dumps(asdict(recipe))),
           "dataset": dataset_definition(recipe.task, recipe.image_size)}
    if recipe.model != "static":
        for stage in (1, 2, 3):
            run.update({f"class_bits_stage{stage}": bits if stage == 1 else 0.0,
                        f"entropy_fraction_stage{stage}": 1.0,
                        f"usage_fraction_stage{stage}": 1.0,
                        f"expert_distance_stage{stage}": 1.0,
                        f"r2_class_stage{stage}": 0.5, f"mean_routing_acc_stage{stage}": acc})
        run["mean_routing_acc"] = acc
    return run


def test_summary_is_mean_interval_and_sample_std_over_seeds(tmp_path):
    runs = [_fake_run("today", s, acc, bits) for s, acc, bits in ((0, 0.9, 0.1), (1, 0.8, 0.3))]
    runs.append(_fake_run("static", 0, 0.5))
    rows = summarise(runs)
    assert [row["variant"] for row in rows] == ["static", "today"]  # VARIANTS order
    today = rows[1]
    assert today["seeds"] == [0, 1] and today["commits"] == ["abc123" * 7]
    assert today["test_acc"] == pytest.approx((85.0, math.sqrt(50.0)))
    half = 12.706204736 * math.sqrt(50.0) / math.sqrt(2)  # t(0.975, 1 df)
    assert today["interval"]["test_acc"] == pytest.approx(half)
    assert today["class_bits_stage1"] == pytest.approx((0.2, math.sqrt(0.02)))
    assert math.isnan(rows[0]["interval"]["test_acc"])  # one seed: no interval
    assert mean_spread([2.0]) == (2.0, 0.0)
    text = write_table(rows, tmp_path / "t.md", tmp_path / "t.csv")
    assert text.startswith("Runs made at commit abc123abc123 ")
    assert "| static | 1 | 50.00 | 0.00 | - | - |" in text
    assert f"| today | 2 | 85.00 ± {half:.2f} | 7.07 |" in text
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header.startswith("variant,seeds,commits,test_acc_mean,test_acc_std,test_acc_ci95")


def test_welch_difference_matches_scipy():
    from scipy.stats import ttest_ind

    a, b = [44.0, 47.5, 41.2, 45.9, 43.3], [39.0, 37.5, 41.2, 36.0]
    difference, half, p_value = welch(a, b)
    assert difference == pytest.approx(sum(a) / 5 - sum(b) / 4)
    assert p_value == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue)
    result = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert difference - half == pytest.approx(result.low)
    assert difference + half == pytest.approx(result.high)
    assert interval_half_width([1.0]) != interval_half_width([1.0])  # NaN


def test_paired_difference_and_image_information():
    from scipy.stats import ttest_rel

    before, after = [44.0, 47.5, 41.2, 45.9], [30.0, 29.5, 26.2, 27.0]
    mean, half, p_value = paired([a - b for a, b in zip(before, after, strict=True)])
    result = ttest_rel(before, after)
    assert p_value == pytest.approx(result.pvalue)
    assert mean - half == pytest.approx(result.confidence_interval(0.95).low)
    run = {"recipe": {"num_experts": 4}, "usage_fraction_stage2": 0.9,
           "entropy_fraction_stage2": 0.6}
    assert image_bits(run, 2) == pytest.approx(0.6)  # (0.9 - 0.6) * log2(4)


def test_check_finds_stale_runs_missing_seeds_and_tables(tmp_path):
    runs = [_fake_run("recommended", s, 0.99) for s in range(2)]
    runs += [_fake_run("uniform-mix", s, 0.98) for s in range(2)]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    for name, text in render_all(runs).items():
        (tmp_path / name).write_text(text)
    assert check(tmp_path, variants=("recommended", "uniform-mix"), min_seeds=2) == []
    assert "| input-dependent routing, digits | recommended | uniform-mix | 2 / 2 |" in (
        tmp_path / "comparisons.md").read_text()
    problems = check(tmp_path, variants=("recommended", "static"), min_seeds=2)
    assert problems == ["static: 0 seeds, fewer than 2"]
    # A run made on another version of the data set, or without its commit, is stale; a table
    # edited by hand no longer matches.
    runs[0]["dataset"] = {**runs[0]["dataset"], "test_size": 100}
    del runs[1]["commit"]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (tmp_path / "quoted.md").write_text("edited\n")
    problems = check(tmp_path, variants=(), min_seeds=2)
    assert any("recommended seed 0: its data set" in p for p in problems)
    assert any("recommended seed 1: no commit" in p for p in problems)
    assert any("quoted.md does not match" in p for p in problems)
    assert any("ablation.md does not match" in p for p in problems)  # its commit line changed


def test_reproduction_table():
    committed = [_fake_run("recommended", s, acc) for s, acc in enumerate((0.98, 0.99, 1.0))]
    rerun = [_fake_run("recommended", 0, 0.98), _fake_run("recommended", 1, 0.985)]
    rerun[0]["commit"] = "def456" * 7
    text = render_reproduction(committed, rerun)
    assert "rerun: commit abc123abc123, def456def456." in text
    # 98.25 lies within 99 ± t(0.975, 2) * 1 / sqrt(3) = 99 ± 2.48; seed 0 is identical.
    assert "| recommended | 99.00 ± 2.48 | 98.25 | 2 | yes | 0.33 |" in text
    assert text.rstrip().endswith("| 1 of 2 |")


def test_committed_ablation_matches_its_runs_and_the_current_code():
    """The committed tables are what runs.jsonl gives, every run carries its commit and was made
    on the data set and recipe the code defines now, and every quoted comparison has all SEEDS.
    (No training: a figure made by older code is told by its recipe, data set and commit.)"""
    assert check(ABLATION) == []


def test_readme_quotes_the_regenerated_tables():
    """Every table row of quoted.md (the figures the README's training section quotes) is in
    README.md word for word."""
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in (ABLATION / "quoted.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("|---")]
    missing = [row for row in rows if row not in readme]
    assert missing == [], "README.md does not quote the current quoted.md"


def test_one_short_run_reports_every_metric():
    record = run_one("affine-recommended",
                     replace(VARIANTS["affine-recommended"], epochs=1, anneal_epochs=1,
                             widths=(8, 8, 8)), 0)
    assert record["variant"] == "affine-recommended" and record["seed"] == 0
    assert len(record["commit"]) == 40 and isinstance(record["uncommitted"], list)
    assert record["dataset"] == dataset_definition("digits-affine", 32)
    assert record["test_images"] == AFFINE_TEST_COPIES * TEST_SIZE
    assert 0.1 < record["test_acc"] <= 1
    assert 0 < record["mean_routing_acc"] <= 1
    for stage in (1, 2, 3):
        assert 0 < record[f"entropy_fraction_stage{stage}"] <= 1 + 1e-9
        assert 0 <= record[f"class_bits_stage{stage}"] <= 2 + 1e-9  # at most log2 K
        assert 0 < record[f"expert_distance_stage{stage}"] < 2
        for name in R2_VARIABLES:
            assert 0 <= record[f"r2_{name}_stage{stage}"] <= 1
        assert 0 < record[f"mean_routing_acc_stage{stage}"] <= 1
    assert [row["epoch"] for row in record["curve"]] == [0, 1]
    assert len(record["routing_per_class"]) == 3
    static = run_one("static", replace(VARIANTS["static"], epochs=1, widths=(8, 8, 8)), 0)
    assert "r2_class_stage1" not in static and static["test_images"] == TEST_SIZE


def test_odconv_recipes_are_quoted_and_compared():
    assert {"odconv", "affine-odconv"} <= set(QUOTED)
    compared = {(better, baseline) for _, better, baseline in COMPARISONS}
    assert {("odconv", "recommended"), ("odconv", "static"),
            ("affine-odconv", "affine-recommended"), ("affine-odconv", "affine-static")} <= compared
    runs = [_fake_run(variant, s, acc) for variant, acc in (("odconv", 0.97), ("recommended", 0.99))
            for s in range(2)]
    for run in runs:
        if run["variant"] == "odconv":
            run["mean_attention_acc"] = 0.5
    tables = render_all(runs)
    assert "| DynamicCNN of ODConv2d, the defaults' recipe | 2 / 0 |" in tables["quoted.md"]
    assert "| ODConv, all four attentions at their batch mean, digits (same models, paired) | 2 " \
        "| -47.00 |" in tables["quoted.md"]
    assert "| ODConv over DynamicConv, digits | odconv | recommended | 2 / 2 | -2.00 |" in (
        tables["comparisons.md"])
    assert "| odconv | 2 | 97.00 ± 0.00 | 97.00 ± 0.00 | 50.00 ± 0.00 |" in tables["ablation.md"]


def test_one_short_odconv_run_reports_its_attention_metrics():
    record = run_one("odconv", replace(VARIANTS["odconv"], epochs=1, anneal_epochs=1,
                                       widths=(8, 8, 8), image_size=16), 0)
    assert record["recipe"]["model"] == "odconv"
    assert 0 < record["test_acc"] <= 1 and 0 < record["mean_attention_acc"] <= 1
    for stage in (1, 2, 3):
        assert 0 < record[f"entropy_fraction_stage{stage}"] <= 1 + 1e-9
        assert 0 < record[f"expert_distance_stage{stage}"] < 2
        assert 0 <= record[f"r2_class_stage{stage}"] <= 1
