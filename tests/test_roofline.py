"""The H200 roofline model of ``python -m dynconv.autotune roofline`` (pure arithmetic, no GPU)."""

from __future__ import annotations

import csv

import pytest

from dynconv.autotune import roofline
from dynconv.autotune.shapes import ConvShape, get_shape_set

SETS = ("resnet18", "resnet50", "mobilenetv2")


def test_static_flops_match_convshape():
    for shape in get_shape_set("resnet18"):
        row = roofline.layer_roofline(shape, batch=32, experts=4)
        assert row.flops == shape.flops(32)
        assert row.flops == (2 * 32 * shape.cout * shape.ho * shape.wo
                             * shape.cin // shape.groups * shape.kh * shape.kw)


def test_min_bytes_read_x_write_y_read_bank_once():
    shape = ConvShape("c", 64, 128, 28, 28, 3, 3, 1, 1)
    row = roofline.layer_roofline(shape, batch=8, experts=4, dtype="bf16")
    w = 128 * 64 * 9
    assert row.min_bytes == 2 * (8 * 64 * 28 * 28 + 8 * 128 * 28 * 28 + 4 * w)
    fp32 = roofline.layer_roofline(shape, batch=8, experts=4, dtype="fp32")
    assert fp32.min_bytes == 2 * row.min_bytes


@pytest.mark.parametrize("experts", [1, 4, 8])
def test_spanning_is_k_times_the_static_flops(experts):
    # A compute-bound layer with a full grid: the spanning bound is K x the static FLOPs at the
    # spanning tiling's efficiency.
    shape = ConvShape("c", 256, 256, 56, 56, 3, 3, 1, 1)
    row = roofline.layer_roofline(shape, batch=32, experts=experts)
    dev = roofline.h200("bf16")
    rate = dev.efficiency * dev.peak_flops * row.spanning_eff
    assert row.spanning_bound == "compute"
    assert row.spanning_s == pytest.approx(experts * row.flops / rate)


def test_fused_extra_traffic_grows_with_row_tiles():
    # Same channels, larger images -> more per-sample row tiles -> more bank re-reads.
    extras = [roofline.layer_roofline(ConvShape("c", 256, 256, s, s, 3, 3, 1, 1), 32, 4)
              .fused_extra_bytes for s in (7, 14, 28, 56)]
    assert extras == sorted(extras) and len(set(extras)) == len(extras)
    # and with the batch (one row tile per sample at least)
    shape = ConvShape("c", 512, 512, 7, 7, 3, 3, 1, 1)
    b8 = roofline.layer_roofline(shape, 8, 4).fused_extra_bytes
    b32 = roofline.layer_roofline(shape, 32, 4).fused_extra_bytes
    assert b32 == 4 * b8 == 4 * 8 * 4 * 512 * 512 * 9 * 2


def test_issue_figure_fused_rereads_about_600_mb_at_512_channels():
    row = roofline.layer_roofline(ConvShape("c", 512, 512, 7, 7, 3, 3, 1, 1), 32, 4)
    assert row.fused_extra_bytes == pytest.approx(600e6, rel=0.05)
    assert row.fused_extra_from == "L2"


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize(("batch", "experts", "dtype"),
                         [(32, 4, "bf16"), (1, 1, "fp32"), (128, 8, "fp16")])
def test_no_dynamic_strategy_beats_the_static_roofline(set_name, batch, experts, dtype):
    for row in roofline.roofline_table(set_name, batch, experts, dtype):
        for strategy in roofline.STRATEGIES:
            assert row.ratio(strategy) >= 1 - 1e-9, (row.layer, strategy, row.ratio(strategy))
        assert row.best in roofline.CANDIDATES
        assert row.time(row.best) == min(row.time(s) for s in roofline.CANDIDATES)


def test_small_images_favour_fused_over_premix_at_resnet18():
    rows = {r.layer: r for r in roofline.roofline_table("resnet18", 32, 4, "bf16")}
    assert rows["layer1.0.conv1"].best == "premix"
    assert rows["layer4.0.conv2"].ratio("fused") < rows["layer4.0.conv2"].ratio("premix")


def test_cli_prints_and_writes_csv_and_md(tmp_path, capsys):
    code = roofline.main(["--set", "resnet18", "--batch", "16", "--experts", "2",
                          "--dtype", "fp16", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| layer4.0.conv2 |" in out and "**network**" in out
    stem = tmp_path / "roofline_resnet18_B16_K2_fp16"
    with open(f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == [s.name for s in get_shape_set("resnet18")]
    assert set(roofline.CSV_FIELDS) == set(rows[0])
    assert all(float(r["fused_ratio"]) >= 1 for r in rows)
    assert (tmp_path / "roofline_resnet18_B16_K2_fp16.md").read_text().startswith("# Roofline")


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        roofline.main(["--set", "resnet99"])
    with pytest.raises(SystemExit):
        roofline.main(["--batch", "0"])
