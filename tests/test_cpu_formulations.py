"""The native path's benchmark (``python -m dynconv.autotune cpu-formulations``) on a tiny case:
provider names, the per-part measurement behind the rule, the tables, the goal summary and the
fresh-process memory figure."""

from __future__ import annotations

import csv

import pytest

from dynconv.autotune import cpu_formulations as cf
from dynconv.autotune.bench import Case
from dynconv.autotune.measure import git_commit
from dynconv.autotune.shapes import ConvShape

TINY = Case("test", ConvShape("tiny", 4, 6, 7, 7, 3, 3, 1, 1), batch=2, experts=3)


def test_parse_provider():
    assert cf.parse_provider("grouped") == ("grouped", None, None)
    assert cf.parse_provider("auto") == ("auto", None, None)
    assert cf.parse_provider("auto:recompute") == ("auto:recompute", None, None)
    assert cf.parse_provider("native:im2col@3") == ("native", ("im2col",) * 3, 3)
    assert cf.parse_provider("native:per_sample/im2col/grouped") == (
        "native", ("per_sample", "im2col", "grouped"), None)
    for bad in ("native:fft", "native:grouped/im2col", "native:grouped@x", "static:grouped"):
        with pytest.raises(ValueError, match="provider"):
            cf.parse_provider(bad)


def test_measure_parts_rows_and_table(tmp_path):
    rows = cf.measure_parts(TINY, threads=1, rounds=2)
    # One row per part and formulation, each with a positive ratio and the rule's choice.
    assert {(r["part"], r["formulation"]) for r in rows} == {
        (p, f) for p in cf.PARTS for f in cf.FORMULATIONS}
    plan = cf.rule_choice(TINY, 1)
    for r in rows:
        assert r["ratio"] > 0 and r["time_ms"] > 0
        assert r["rule"] == plan[cf.PARTS.index(r["part"])]
        assert r["commit"] == git_commit()
    path = tmp_path / "parts.csv"
    cf._write_csv(str(path), rows)
    table = cf.parts_markdown_table(str(path)).splitlines()
    assert len(table) == 3 and "fwd grouped" in table[0] and table[2].count("|") == 19


def _write_provider_rows(path, ratios, reference="static"):
    rows = []
    for (batch, provider), ratio in ratios.items():
        rows.append({**cf.case_columns(Case("t", TINY.shape, batch=batch)), "threads": 1,
                     "clock": "wall", "provider": provider, "reference": reference,
                     "mode": "fwd+bwd", "time_ms": 1.0, "static_ms": 1.0, "ratio": ratio,
                     "ratio_of_mins": ratio, "rule": "grouped/grouped/grouped"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_goal_summary_counts_wins_and_losses(tmp_path):
    path = tmp_path / "providers.csv"
    _write_provider_rows(path, {
        (2, "loop"): 2.0, (2, "grouped"): 1.5, (2, "auto"): 1.2,  # a win, <= 1.3
        (4, "loop"): 3.0, (4, "grouped"): 1.4, (4, "auto"): 1.7,  # a loss, > 1.6
    })
    summary = cf.goal_summary(str(path))
    assert "2 cases (ratios to static): auto at most the better baseline on 1, within 5 % of " \
           "it on 1, within 5 % or 0.2 ms on 1, at most 1.6x static on 1, at most 1.3x on 1" \
           in summary
    assert "B4 4->6 k3 s1 @7 K4 fp32 nchw, 1 thread(s): 1.70 against 1.40 (21% slower, 0.30 ms, " \
           "outside the goal)" in summary
    assert "B2 " not in summary.split("baseline:")[1]


def test_goal_summary_of_a_direct_comparison(tmp_path):
    # --reference grouped: the CSV has no grouped rows; its ratio is 1 by definition.
    path = tmp_path / "direct.csv"
    _write_provider_rows(path, {
        (2, "loop"): 1.5, (2, "auto"): 1.04,  # within 5 % of the trick
        (4, "loop"): 0.9, (4, "auto"): 0.8,  # a win
        (8, "loop"): 2.0, (8, "auto"): 1.2,  # a loss
    }, reference="grouped")
    summary = cf.goal_summary(str(path))
    assert "3 cases (ratios to the grouped provider): auto at most the better baseline on 1, " \
           "within 5 % of it on 2, within 5 % or 0.2 ms on 3;" in summary
    assert "1.6x" not in summary
    assert "B8 4->6 k3 s1 @7 K4 fp32 nchw, 1 thread(s): 1.20 against 1.00 (20% slower, 0.20 ms)" \
        in summary


def test_goal_is_5_percent_or_0_2_ms(tmp_path):
    # The goal: auto within 5 % or within 0.2 ms per call of the better baseline (the ms from
    # the ratios and the reference's time: static_ms of the rows, 1 ms here).
    assert cf.within_goal(1.05, 1.0, 100.0) and not cf.within_goal(1.06, 1.0, 100.0)
    assert cf.within_goal(1.5, 1.0, 0.4) and not cf.within_goal(1.5, 1.0, 0.41)
    path = tmp_path / "goal.csv"
    _write_provider_rows(path, {
        (2, "loop"): 2.0, (2, "grouped"): 1.0, (2, "auto"): 1.15,  # 15 %, but 0.15 ms
        (4, "loop"): 2.0, (4, "grouped"): 1.0, (4, "auto"): 1.25,  # 25 %, 0.25 ms
    })
    summary = cf.goal_summary(str(path))
    assert "within 5 % of it on 0, within 5 % or 0.2 ms on 1" in summary
    assert "(15% slower, 0.15 ms)" in summary and "(25% slower, 0.25 ms, outside" in summary


def test_measure_provider_rows():
    rows = cf.measure(TINY, ["grouped", "native:per_sample"], threads=1, rounds=2,
                      modes=["fwd"])
    assert [r["provider"] for r in rows] == ["grouped", "native:per_sample"]
    assert all(r["ratio"] > 0 and r["mode"] == "fwd" for r in rows)
    assert all(r["commit"] == git_commit() and r["commit"] for r in rows)


def test_measure_against_another_provider():
    # --reference grouped: each provider interleaved with, and divided by, the grouped trick.
    rows = cf.measure(TINY, ["auto", "auto:recompute"], threads=1, rounds=2, modes=["fwd+bwd"],
                      reference="grouped")
    assert [r["provider"] for r in rows] == ["auto", "auto:recompute"]
    assert all(r["reference"] == "grouped" and r["ratio"] > 0 for r in rows)


def test_fresh_process_memory_of_a_forced_formulation():
    result = cf.fresh_process_memory(TINY, "native:im2col", threads=1)
    assert result["peak_rss_bytes"] > 2**20 and result["extra_bytes"] > 0
    assert result["rss_before_bytes"] + result["extra_bytes"] == result["peak_rss_bytes"]
