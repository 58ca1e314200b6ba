"""The CPU goals in the bench report, on small synthetic bench CSVs (no timing): the speed
rule per case and mode in each allocator setting's run, the geometric mean over the layers per
setting (labelled from the CSVs' own columns), the memory figure; and the bench's
position-neutral rounds, with a fake timer."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dynconv.autotune import bench, report
from dynconv.autotune.cpu_formulations import within_goal

# --- the rule ----------------------------------------------------------------------------------


def test_rule_accepts_a_small_loss_on_a_tiny_case_and_flags_a_losing_row():
    # 0.15 ms slower on a 0.3 ms case: 50 %, but under 0.2 ms per call
    assert report.rule_ok(0.45, 0.30)
    # within 5 % on a large case: 0.4 ms, 4 %
    assert report.rule_ok(10.4, 10.0)
    # at the edges: exactly 0.2 ms, exactly 5 %
    assert report.rule_ok(1.2, 1.0) and report.rule_ok(21.0, 20.0)
    # both over: 2 ms and 20 %
    assert not report.rule_ok(12.0, 10.0)
    assert not report.rule_ok(0.55, 0.30)  # 0.25 ms, 83 %
    # the same function as cpu_formulations' goal (one rule, not two)
    assert report.within_goal is within_goal
    assert report.rule_ok(0.45, 0.30) == within_goal(1.5, 1.0, 0.3)


# --- synthetic CSVs ----------------------------------------------------------------------------

MiB = 2**20


def _case(group, shape, batch, times, static, memory=None, experts=4):
    """Rows of one case: ``times`` provider -> (fwd ms, fwd+bwd ms), ``static`` (fwd, fwd+bwd);
    ``memory``: provider -> fwd+bwd excess in MiB (a memory-only case when times is empty)."""
    cin = int(shape.split("->")[0].split()[-1])
    base = {"group": group, "layer": shape, "shape": shape, "cin": cin, "cout": cin,
            "spatial_dims": 2, "d": 1, "h": 14, "w": 14, "kd": 1, "kh": 3, "kw": 3, "stride": 1,
            "padding": 1, "dilation": 1, "groups": 1, "batch": batch, "experts": experts,
            "dtype": "fp32", "layout": "nchw"}
    rows = []
    providers = {"static": static, **times} if times else dict.fromkeys(memory, None)
    for provider, figures in providers.items():
        for index, mode in enumerate(("fwd", "bwd", "fwd+bwd")):
            if figures is None and mode != "fwd+bwd":
                continue
            ms = figures[min(index, 1)] if figures else math.nan
            ref = static[min(index, 1)] if figures else math.nan
            extra = (memory or {}).get(provider) if mode == "fwd+bwd" else None
            rows.append({**base, "provider": provider, "mode": mode, "status": "ok",
                         "note": "", "time_ms": ms, "static_time_ms": ref,
                         "ratio_to_static": ms / ref if figures else math.nan,
                         "peak_mem_bytes": math.nan if extra is None else (extra + 100) * MiB,
                         "mem_extra_bytes": math.nan if extra is None else extra * MiB,
                         "mem_method": "" if extra is None else "fresh_process_vmhwm"})
    return rows


STEADY = " ".join(f"{k}={v}" for k, v in bench.STEADY_HEAP_ENV.items())


def _write(path, rows, thp="unset", columns=bench.COLUMNS, malloc="unset"):
    meta = {"run_id": "r1", "timestamp": "t", "preset": "quick", "device": "cpu",
            "device_name": "Test CPU", "device_slug": "cpu", "torch": "2", "triton": "",
            "python": "3.11", "commit": "abc", "threads": 1, "cpus": 2,
            "thp_mem_alloc_enable": thp, "malloc_env": malloc, "load_avg_1min": 0.1,
            "rounds": 5}
    frame = pd.DataFrame([{**meta, **row} for row in rows])
    frame = frame.reindex(columns=[c for c in columns if c != "thp_mem_alloc_enable"]
                          + (["thp_mem_alloc_enable"] if "thp_mem_alloc_enable" in columns
                             else []))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _layers(auto_ratio: float, trick_ratio: float = 1.4) -> list[dict]:
    """Two layers (10 ms and 20 ms static fwd+bwd) whose auto ratio is ``auto_ratio``."""
    rows = []
    for shape, ms in (("64->64 k3 s1 @56", 10.0), ("512->512 k3 s1 @7", 20.0)):
        rows += _case("layers", shape, 4, {
            "auto": (ms / 2, ms * auto_ratio), "loop": (ms, ms * 2.0),
            "grouped": (ms / 2, ms * trick_ratio)}, (ms / 3, ms))
    return rows


def _main_rows() -> list[dict]:
    rows = _layers(1.25)
    # a tiny case: auto 0.15 ms slower than the trick (50 %): within the rule
    rows += _case("batch", "128->128 k3 s1 @7", 1, {
        "auto": (0.45, 0.9), "loop": (0.5, 1.0), "grouped": (0.30, 0.9)}, (0.1, 0.3),
        memory={"static": 4.0, "auto": 30.0, "grouped": 60.0, "loop": 30.0})
    # a losing row: forward+backward 2 ms (20 %) over the better baseline (loop)
    rows += _case("experts", "64->64 k3 s1 @14", 16, {
        "auto": (5.0, 12.0), "loop": (5.0, 10.0), "grouped": (5.1, 11.0)}, (4.0, 8.0))
    # the same measurement listed in a second sweep: one row, both groups named
    rows += _case("width", "64->64 k3 s1 @14", 16, {
        "auto": (5.0, 12.0), "loop": (5.0, 10.0), "grouped": (5.1, 11.0)}, (4.0, 8.0))
    # the memory goal's cases: the layers at batch 32, memory only
    rows += _case(bench.MEMORY_GROUP, "64->64 k3 s1 @56", 32, {}, None,
                  memory={"static": 40.0, "auto": 50.0, "grouped": 100.0, "loop": 80.0})
    rows += _case(bench.MEMORY_GROUP, "512->512 k3 s1 @7", 32, {}, None,
                  memory={"static": 36.0, "auto": 30.0, "grouped": 880.0, "loop": 420.0})
    # the batch sweep at batch 32 (measured, outside the goal's layers)
    rows += _case("batch", "128->128 k3 s1 @7", 32, {
        "auto": (1.0, 3.0), "loop": (1.0, 3.0), "grouped": (1.0, 3.0)}, (0.5, 1.0),
        memory={"static": 4.4, "auto": 38.3, "grouped": 59.0, "loop": 32.0})
    return rows


def test_rule_rows_count_list_and_dedupe(tmp_path):
    frame = report.load(str(_write(tmp_path / "cpu" / "bench_quick.csv", _main_rows())))
    rows, unchecked = report.rule_rows(frame)
    assert not unchecked
    # 2 layers + tiny + 64@14 (two sweeps, one measurement) + batch 32: 5 cases x 2 modes
    assert len(rows) == 10
    by = {(r["case"], r["mode"]): r for r in rows}
    tiny = by["B1 128->128 k3 s1 @7 K4 fp32, NCHW", "fwd"]
    assert tiny["ok"] and tiny["best"] == "grouped"
    assert tiny["excess_ms"] == pytest.approx(0.15)
    losing = by["B16 64->64 k3 s1 @14 K4 fp32, NCHW", "fwd+bwd"]
    assert not losing["ok"] and losing["best"] == "loop" and losing["groups"] == "experts, width"
    assert losing["excess_ms"] == pytest.approx(2.0)
    assert sum(not r["ok"] for r in rows) == 1
    # the memory-only cases are not rule rows (they are not timed)
    assert not any("B32 64->64 k3 s1 @56" in r["case"] for r in rows)


def test_summary_states_every_goal_with_the_companion_runs(tmp_path):
    main = _write(tmp_path / "cpu" / "bench_quick.csv", _main_rows())
    # make report's companions: the whole preset with glibc's heap kept under <root>/steady
    # (its losing row wins there), the layers with THP_MEM_ALLOC_ENABLE=1 under <root>/thp
    steady_rows = [r for r in _main_rows() if r["group"] != "layers"] + _layers(1.15)
    for row in steady_rows:
        if row["provider"] == "auto" and row["layer"] == "64->64 k3 s1 @14" \
                and row["mode"] == "fwd+bwd":
            row["time_ms"] = 9.9
    steady = _write(tmp_path / "steady" / "cpu" / "bench_quick.csv", steady_rows,
                    malloc=STEADY)
    thp = _write(tmp_path / "thp" / "cpu" / "bench_quick.csv", _layers(1.1, 1.3), thp="1")
    assert report.companion_paths(str(main)) == {"steady_heap": str(steady), "thp": str(thp)}
    written = report.render([str(main)])
    text = (tmp_path / "cpu" / "summary.md").read_text()
    assert str(tmp_path / "cpu" / "summary.md") in written
    assert "### The CPU goals" in text
    assert ("- as the machine comes (`bench_quick.csv`): **9 of 10 rows ok** (forward 5 of 5, "
            "forward + backward 4 of 5); **not met**") in text
    assert (f"- with glibc's heap kept (`{STEADY}`, the documented setting) "
            "(`../steady/cpu/bench_quick.csv`): **10 of 10 rows ok** (forward 5 of 5, forward "
            "+ backward 5 of 5); **met** on every row") in text
    assert ("- B16 64->64 k3 s1 @14 K4 fp32, NCHW (experts, width), fwd+bwd: auto 12.000 ms "
            "against loop 10.000 ms (+2.000 ms, +20.0 %)") in text
    assert "Rows outside the rule, as the machine comes:" in text
    assert "Rows outside the rule, with glibc" not in text
    # one table: this run's figures, the steady run's verdict beside them
    assert ("| case | groups | mode | auto ms | loop ms | grouped ms | auto - best ms | rule | "
            "steady heap: auto - best ms | rule | THP: auto - best ms | rule | auto ran |") in text
    assert "| B1 128->128 k3 s1 @7 K4 fp32, NCHW | batch | fwd | 0.450 |" in text
    assert "+0.150 (+50.0 %) | ok | +0.150 (+50.0 %) | ok | - | - | - |" in text
    assert "+2.000 (+20.0 %) | **outside** | -0.100 (-1.0 %) | ok | - | - | - |" in text
    assert ("- as the machine comes: auto **1.25x** static over 2 layers (goal <= 1.3x): "
            "**met** (the trick 1.40x; the static conv 30 ms over them; from "
            "`bench_quick.csv`)") in text
    assert (f"- with glibc's heap kept (`{STEADY}`, the documented setting): auto **1.15x** "
            "static over 2 layers (goal <= 1.2x): **met** (the trick 1.40x; the static conv 30 "
            "ms over them; from `../steady/cpu/bench_quick.csv`)") in text
    assert ("- with `THP_MEM_ALLOC_ENABLE=1`: auto **1.10x** static over 2 layers (no goal) (the "
            "trick 1.30x; the static conv 30 ms over them; from `../thp/cpu/bench_quick.csv`)"
            ) in text
    # memory: the layers at batch 32 are the goal's; the batch sweep's row is listed beside
    assert "(2 of 2 within)" in text and "**Memory**" in text
    assert ("- B32 64->64 k3 s1 @56 K4 fp32, NCHW (memory): static 40.0 MiB; above it: auto "
            "+10.0, the trick +60.0: **16.7 %**, within; B x |W| within the saving threshold"
            ) in text
    assert "**auto no more than static**, within" in text
    assert "**62.1 %**, outside; not part of the goal" in text
    assert ("- CPU allocator: as the machine comes in this run (`THP_MEM_ALLOC_ENABLE` unset; "
            "malloc unset)") in text
    # the companions were read, not rendered on their own
    assert report.render([str(main), str(steady), str(thp)]) == written
    assert not (tmp_path / "steady" / "cpu" / "summary.md").exists()
    assert not (tmp_path / "thp" / "cpu" / "summary.md").exists()


def test_summary_says_when_a_companion_is_missing_or_fails_its_goal(tmp_path):
    main = _write(tmp_path / "cpu" / "bench_quick.csv", _layers(1.35))
    report.render([str(main)])
    text = (tmp_path / "cpu" / "summary.md").read_text()
    assert "auto **1.35x** static over 2 layers (goal <= 1.3x): **not met**" in text
    line = next(x for x in text.splitlines() if x.startswith("- with glibc's heap kept"))
    assert "**not measured**" in line and "../steady/cpu/bench_quick.csv`: no such file" in line
    assert "make report" in line
    # THP has no goal: a missing run leaves no line
    assert not any(x.startswith("- with `THP_MEM_ALLOC_ENABLE=1`") for x in text.splitlines())
    assert "**Memory**" in text and "**not measured**: this run has no forward+backward" in text
    # given explicitly and over its goal; a run given as a companion that was not: said so
    steady = _write(tmp_path / "other" / "b.csv", _layers(1.25), malloc=STEADY)
    report.render([str(main)], companion_csvs=(str(steady),))
    text = (tmp_path / "cpu" / "summary.md").read_text()
    assert "auto **1.25x** static over 2 layers (goal <= 1.2x): **not met**" in text
    plain = _write(tmp_path / "other" / "c.csv", _layers(1.1))
    report.render([str(main)], companion_csvs=(str(plain),))
    text = (tmp_path / "cpu" / "summary.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("- with glibc's heap kept"))
    assert "**not measured**" in line and "c.csv` is a second run as the machine comes" in line


def test_the_lines_are_labelled_from_the_csvs_own_columns(tmp_path):
    # a main run made with glibc's heap kept fills that line, not the first
    main = _write(tmp_path / "cpu" / "bench_quick.csv", _layers(1.15), malloc=STEADY)
    report.render([str(main)])
    text = (tmp_path / "cpu" / "summary.md").read_text()
    first = next(x for x in text.splitlines() if x.startswith("- as the machine comes"))
    assert "**not measured**" in first
    assert "auto **1.15x** static over 2 layers (goal <= 1.2x): **met**" in text
    assert ("- CPU allocator: with glibc's heap kept" in text
            and f"malloc {STEADY})" in text)
    # both settings at once, or other malloc variables: another setting, no goal's line
    both = _write(tmp_path / "both" / "cpu" / "bench_quick.csv", _layers(1.15), thp="1",
                  malloc=STEADY)
    assert report.allocator_setting_of(report.load(str(both))) == "other"
    # a CSV written before the columns: taken as the machine comes, and said to be assumed
    old = _write(tmp_path / "old" / "cpu" / "bench_quick.csv", _layers(1.2),
                 columns=[c for c in bench.COLUMNS
                          if c not in ("thp_mem_alloc_enable", "malloc_env")])
    report.render([str(old)])
    text = (tmp_path / "old" / "cpu" / "summary.md").read_text()
    assert "assumed: the CSV does not record its allocator" in text


def test_memory_goal_holds_auto_to_the_trick_within_the_saving_threshold(tmp_path):
    rows = _main_rows()
    # 32->32 at 14x14, B32: B x |W| 1.2 MiB, within max(x / 4, 16 MiB): auto may hold what
    # the trick holds; 128->128: 18 MiB, past it (x is 3 MiB): held to 40 % of the trick's
    rows += _case(bench.MEMORY_GROUP, "32->32 k3 s1 @14", 32, {}, None,
                  memory={"static": 10.0, "auto": 20.5, "grouped": 20.0})
    rows += _case(bench.MEMORY_GROUP, "128->128 k3 s1 @14", 32, {}, None,
                  memory={"static": 10.0, "auto": 30.0, "grouped": 30.0})
    frame = report.load(str(_write(tmp_path / "cpu" / "bench_quick.csv", rows)))
    by = {r["case"]: r for r in report.memory_rows(frame)}
    small = by["B32 32->32 k3 s1 @14 K4 fp32, NCHW"]
    assert small["small"] and small["ok"] and small["percent"] == pytest.approx(105.0)
    large = by["B32 128->128 k3 s1 @14 K4 fp32, NCHW"]
    assert not large["small"] and not large["ok"]
    # past the slack (1 MiB over the trick's), a small layer is outside too
    over = _case(bench.MEMORY_GROUP, "16->16 k3 s1 @14", 32, {}, None,
                 memory={"static": 10.0, "auto": 21.5, "grouped": 20.0})
    frame = report.load(str(_write(tmp_path / "x" / "cpu" / "bench_quick.csv", over)))
    (row,) = report.memory_rows(frame)
    assert row["small"] and not row["ok"]


# --- the bench's rounds ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_round_order_balances_positions_and_neighbours(count):
    names = ["static", "auto", "loop", "grouped", "timm"][:count]
    rounds = count if count % 2 == 0 else 2 * count
    orders = [bench.round_order(names, r) for r in range(rounds)]
    assert all(sorted(order) == sorted(names) for order in orders)
    # every name in every position equally often
    for position in range(count):
        column = [order[position] for order in orders]
        assert all(column.count(name) == rounds // count for name in names)
    # every name right after every other equally often (within a round)
    pairs = [(a, b) for order in orders for a, b in zip(order, order[1:])]
    expected = (count - 1) * rounds // (count * (count - 1))
    assert all(pairs.count((a, b)) == expected for a in names for b in names if a != b)
    assert bench.round_order(names, rounds) == orders[0] and bench.round_order([], 3) == []


class FakeTimer:
    """Samples from a script: name -> one figure per round; records the calling order."""

    def __init__(self, script):
        self.script = {name: list(values) for name, values in script.items()}
        self.order: list[str] = []

    def calls_for(self, fn):
        fn()
        return 1

    def sample(self, fn, calls=1):
        name = fn()
        self.order.append(name)
        return self.script[name].pop(0)


def test_interleaved_rounds_rotate_and_the_figure_is_the_minimum():
    def named(name):
        return lambda: name

    def broken():
        raise RuntimeError("no kernel")

    script = {"static": [2.0, 1.0, 1.5, 1.2, 1.1], "auto": [3.0, 2.5, 2.0, 2.2, 4.0],
              "loop": [9.0] * 5}
    timer = FakeTimer(script)
    fns = {"static": named("static"), "auto": named("auto"), "loop": named("loop"),
           "bad": broken}
    samples, errors = bench.interleaved_rounds(timer, fns, rounds=5)
    assert list(errors) == ["bad"] and "no kernel" in str(errors["bad"])
    rounds = [timer.order[i:i + 3] for i in range(0, 15, 3)]
    names = list(fns)
    for index, order in enumerate(rounds):  # "bad" dropped; the others keep their order
        assert order == [n for n in bench.round_order(names, index) if n != "bad"]
    assert {r[0] for r in rounds} == {"static", "auto", "loop"}
    figures = bench.summarize_samples(samples["auto"], samples["static"])
    assert figures["time_ms"] == 2.0 and figures["static_time_ms"] == 1.0
    assert figures["ratio_to_static"] == 2.0
    assert figures["time_median_ms"] == 2.5
    assert figures["ratio_median"] == pytest.approx(sorted(
        a / s for a, s in zip(script["auto"], script["static"]))[2])


def test_quick_preset_groups_and_rounds(capsys):
    from dynconv.autotune import __main__ as cli

    code = cli.main(["bench", "--preset", "quick", "--groups", "layers", "--rounds", "2",
                     "--dry-run", "--out", "/nonexistent"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "dry run: 6 cases" in out and ", 5 rounds;" in out
    assert "--rounds 2 raised to 5" in err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--preset", "quick", "--groups", "nope", "--dry-run"])
    assert "'nope' not in preset 'quick'" in capsys.readouterr().err
    memory = [c for c in bench.preset_cases("quick", "cpu") if c.group == bench.MEMORY_GROUP]
    layers = [c for c in bench.preset_cases("quick", "cpu") if c.group == "layers"]
    assert [c.shape for c in memory] == [c.shape for c in layers]
    assert all(c.batch == 32 and c.memory and not c.timing for c in memory)


# --- ODConv's CSV beside the main one ----------------------------------------------------------


def _odconv_rows() -> list[dict]:
    """Two layers of the odconv group: the published formulation 2x / 4x static, the library's
    1.5x / 1.2x (fwd, fwd+bwd: the same ratio), memory 3x / 1.5x static's excess."""
    rows = []
    for shape, ms, published, library in (("64->64 k3 s1 @56", 10.0, 2.0, 1.5),
                                          ("512->512 k3 s1 @7", 20.0, 4.0, 1.2)):
        rows += _case(bench.ODCONV_GROUP, shape, 4, {
            "odconv_published": (ms / 3 * published, ms * published),
            "odconv_auto": (ms / 3 * library, ms * library)}, (ms / 3, ms),
            memory={"static": 10.0, "odconv_published": 30.0, "odconv_auto": 15.0})
    return [r for r in rows if r["mode"] != "bwd"]  # make report times fwd and fwd+bwd


def test_the_odconv_section_closes_the_summary_and_leaves_the_goals_alone(tmp_path):
    main = _write(tmp_path / "cpu" / "bench_quick.csv", _main_rows())
    report.render([str(main)])
    before = (tmp_path / "cpu" / "summary.md").read_text()
    odconv = _write(tmp_path / "cpu" / "odconv.csv", _odconv_rows())
    assert report.odconv_companion(str(main)) == str(odconv)
    # a folder search takes only bench_*.csv: the ODConv CSV is read beside the main one
    assert report.find_csvs([str(tmp_path / "cpu")]) == [str(main)]
    written = report.render(report.find_csvs([str(tmp_path / "cpu")]))
    assert str(tmp_path / "cpu" / "odconv.md") in written
    text = (tmp_path / "cpu" / "summary.md").read_text()
    assert text.startswith(before.rstrip("\n"))  # everything before it unchanged
    section = text[len(before.rstrip("\n")):]
    assert section.lstrip("\n").startswith("## ODConv: the library's scales against the "
                                           "published formulation (`odconv.csv`")
    assert "### The CPU goals" not in section
    assert "| `odconv_published` | 2.83 | 2.83 | 3.00 |" in section  # sqrt(2 * 4)
    assert "| `odconv_auto` | 1.34 | 1.34 | 1.50 |" in section  # sqrt(1.5 * 1.2)
    assert ("| 64->64 k3 s1 @56 64->64 k3 s1 @56 | 4 | 3.333 | 10.000 | 10.0 | 2.00 | 2.00 | "
            "3.00 | 1.50 | 1.50 | 1.50 |") in section
    alone = (tmp_path / "cpu" / "odconv.md").read_text()
    assert alone.startswith("# dynconv ODConv performance: Test CPU")
    assert section.strip() in alone
    # named on its own, the ODConv CSV gives odconv.md and leaves summary.md alone
    (tmp_path / "cpu" / "odconv.md").unlink()
    assert report.render([str(odconv)], explicit=(str(odconv),)) == [
        str(tmp_path / "cpu" / "odconv.md")]
    assert (tmp_path / "cpu" / "summary.md").read_text() == text
