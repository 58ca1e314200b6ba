"""The ``python -m dynconv.autotune`` command line on CPU: help, dry runs, a tiny bench, the
report rendered from it, the interpreter sweep's write-then-load cycle, and bad arguments."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dynconv.autotune import __main__ as cli
from dynconv.autotune.bench import (
    COLUMNS,
    DEFAULT_PROVIDERS,
    MODES,
    PROVIDER_GROUPS,
    preset_cases,
)
from dynconv.autotune.shapes import SHAPE_SETS, get_shape_set, parse_shape, tiny
from dynconv.backends.native.rule import FormulationPlan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the dispatcher in-process; (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# --- the measuring library ---------------------------------------------------------------------


def _busy(n: int):
    return lambda: sum(range(n))


@pytest.mark.parametrize("clock", ["wall", "process"])
def test_interleaved_timer_gives_sane_ratios(clock):
    from dynconv.autotune.measure import Timer

    timer = Timer("cpu", clock, min_sample_ms=5.0)
    if clock == "wall":
        # sleeps of several ms: waking up can take a millisecond more when the cores are busy
        # (pytest-xdist's other worker), which would move a 1-vs-2 ms ratio out of the bounds
        fn, static_fn = lambda: time.sleep(0.008), lambda: time.sleep(0.004)
    else:  # CPU time: busy work, twice as much
        fn, static_fn = _busy(40_000), _busy(20_000)
    timing = timer.interleaved(fn, static_fn, rounds=5)
    assert len(timing.times_ms) == len(timing.static_times_ms) == 5
    assert timing.time_ms > timing.static_ms > 0
    assert 1.4 < timing.ratio < 2.8, timing
    assert 1.2 < timing.ratio_of_mins < 3.5, timing
    same = timer.interleaved(static_fn, static_fn, rounds=5)
    assert 0.6 < same.ratio < 1.6, same
    if clock == "wall":  # sub-sample calls are batched: a 1 ms call fills a 5 ms sample
        assert timer.calls_for(lambda: time.sleep(0.001)) in range(2, 6)


def test_fresh_process_memory_probe_reports_a_positive_peak():
    from dynconv.autotune.bench import Case, fwd_bwd_run
    from dynconv.autotune.measure import fresh_process_peak_rss, read_proc_status

    assert read_proc_status("VmRSS") > 0 and read_proc_status("NoSuchField") is None
    case = Case("memory", parse_shape("cin=16,cout=16,hw=16,k=3"), 8)
    result = fresh_process_peak_rss(fwd_bwd_run, (case, "auto"), threads=1)
    assert result.status == "ok", result.note
    assert result.peak_bytes > 2**20 and result.extra_bytes > 0
    assert result.rss_before_bytes + result.extra_bytes == result.peak_bytes
    failed = fresh_process_peak_rss(fwd_bwd_run, (case, "no-such-provider"), threads=1)
    assert failed.status == "error" and "no-such-provider" in failed.note


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_pinned_mmap_threshold_gives_every_freed_block_back():
    # the memory probe's child pins glibc's threshold so that its RSS peak is what a call
    # holds, not what earlier calls left in the heap: a freed 8 MiB block leaves RSS each time
    # (by default glibc would raise its threshold after the first and keep the second)
    code = textwrap.dedent("""
        import torch
        from dynconv.autotune.measure import pin_mmap_threshold, read_proc_status
        assert pin_mmap_threshold()
        torch.ones(8 * 2**20 // 4)  # the first call's own allocations (kernels, caches)
        for _ in range(3):
            before = read_proc_status("VmRSS")
            block = torch.ones(8 * 2**20 // 4)
            held = read_proc_status("VmRSS") - before
            del block
            left = read_proc_status("VmRSS") - before
            assert held >= 7 * 2**20 and left < 2**20, (held, left)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_allocator_settings_set_only_their_variables():
    from dynconv.autotune import bench

    env = {"PATH": "/bin", "THP_MEM_ALLOC_ENABLE": "1", "MALLOC_TRIM_THRESHOLD_": "5",
           "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    assert bench.allocator_environment("inherit", env) is None
    assert bench.allocator_environment("default", env) == {"PATH": "/bin"}
    assert bench.allocator_environment("thp", env) == {"PATH": "/bin",
                                                       "THP_MEM_ALLOC_ENABLE": "1"}
    assert bench.allocator_environment("steady-heap", env) == {"PATH": "/bin",
                                                               **bench.STEADY_HEAP_ENV}


def test_bench_restarts_with_the_allocator_setting_and_records_it(tmp_path):
    # the variables are read at start-up: the run starts again with them, and its rows say so
    from dynconv.autotune import bench

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    subprocess.run([sys.executable, "-m", "dynconv.autotune", "bench", "--shape",
                    "cin=8,cout=8,hw=8,k=3", "--batch", "2", "--providers", "auto",
                    "--modes", "fwd,fwd+bwd", "--rounds", "1", "--no-memory", "--no-progress",
                    "--allocator", "steady-heap", "--out", str(tmp_path)],
                   check=True, env=env, timeout=300, capture_output=True)
    with open(tmp_path / "cpu" / "bench_custom.csv") as f:
        rows = list(csv.DictReader(f))
    steady = " ".join(f"{k}={v}" for k, v in bench.STEADY_HEAP_ENV.items())
    assert rows and all(r["malloc_env"] == steady for r in rows)
    # and what auto ran: a small layer takes the trick's graph with gradients
    paths = {r["mode"]: r["auto_path"] for r in rows if r["provider"] == "auto"}
    assert paths == {"fwd": "native: grouped", "fwd+bwd": "the grouped trick's graph"}


def test_isolated_bench_times_each_provider_in_its_own_process(tmp_path):
    """--isolate: every row timed, the run says how; the report's timing line too."""
    from dynconv.autotune import report

    subprocess.run([sys.executable, "-m", "dynconv.autotune", "bench", "--shape",
                    "cin=8,cout=8,hw=8,k=3", "--batch", "2", "--providers", "auto,grouped",
                    "--modes", "fwd,fwd+bwd", "--rounds", "2", "--no-memory", "--no-progress",
                    "--isolate", "--out", str(tmp_path)],
                   check=True, timeout=300, capture_output=True)
    with open(tmp_path / "cpu" / "bench_custom.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("static", "auto", "grouped") for m in ("fwd", "fwd+bwd")}
    for row in rows:
        assert row["status"] == "ok" and float(row["time_ms"]) > 0
        assert row["timing_processes"] == "one per provider"
    frame = report.load(str(tmp_path / "cpu" / "bench_custom.csv"))
    assert "in a process of its own" in report._timing_line(frame, gpu=False)
    assert "--isolate" in report._cpu_run_options(frame)


def test_provider_process_times_in_the_child_and_names_its_errors():
    from dynconv.autotune.bench import Case, ProviderProcess
    from dynconv.autotune.measure import Timer

    case = Case("layers", parse_shape("cin=4,cout=4,hw=6,k=3"), 2)
    process = ProviderProcess(Timer("cpu", min_sample_ms=1.0))
    try:
        call = process.prepare(case, "auto", "fwd+bwd")
        assert call.calls_for() >= 1 and call.sample(2) > 0
        with pytest.raises(RuntimeError, match="KeyError"):
            process.prepare(case, "no-such-provider", "fwd")
        assert process.prepare(case, "static", "fwd").sample(1) > 0  # still serving
    finally:
        process.close()


def test_auto_path_names_the_native_formulations_and_chunks():
    from dynconv.autotune.bench import Case, auto_path, forward_fn, make_inputs
    from dynconv.backends.native import op

    case = Case("layers", parse_shape("cin=8,cout=16,hw=8,k=1"), 4)
    forward, _ = forward_fn("auto", case, make_inputs(case, "cpu"))
    plan = FormulationPlan("im2col", "per_sample", "im2col")
    original = op._plan
    with op.force_formulation(plan, chunk=2):
        assert auto_path(forward, "fwd") == "native: im2col, chunks of 2"
        assert auto_path(forward, "fwd+bwd") == "native: im2col / per_sample / im2col, chunks of 2"
    assert op._plan is original  # put back
    assert auto_path(lambda: None, "fwd") == ""  # no native call: nothing to say


def test_versions_record_the_git_commit():
    from dynconv.autotune import measure

    record = measure.versions()
    assert set(record) == {"torch", "triton", "python", "commit"}
    assert record["commit"] == measure.git_commit()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=root)
    if head.returncode == 0 and os.path.samefile(measure._SOURCE_ROOT, root):
        # the tools run from this checkout: HEAD's short hash, maybe marked dirty
        assert record["commit"].removesuffix("-dirty") == head.stdout.strip()
    else:  # an installed copy: no commit to claim
        assert record["commit"] == "unknown"
    assert measure.device_slug("cpu") == "cpu"


# --- help and dry runs -------------------------------------------------------------------------


def test_dispatcher_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("bench", "report", "sweep", "gpu-check", "compile-check",
                    "cpu-formulations"):
        assert command in out
    assert set(cli.COMMANDS) == set(cli.SUMMARIES)


def test_module_help_lists_every_command_on_stdout():
    result = subprocess.run([sys.executable, "-m", "dynconv.autotune", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in cli.COMMANDS:
        assert f"  {command} " in result.stdout


def test_unknown_command_is_an_error(capsys):
    code, _, err = run_cli(capsys, "benchmark")
    assert code == 2
    assert "bench" in err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_subcommand_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "usage:" in out


def test_bench_dry_run_lists_cases_and_writes_nothing(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "--preset", "quick", "--dry-run", "--out",
                           str(tmp_path))
    assert code == 0
    assert f"dry run: {len(preset_cases('quick', 'cpu'))} cases" in out
    assert "layer3.0.conv2" in out and "256->256 k3 s1 @14" in out
    assert "provider triton would be skipped" in out
    assert list(tmp_path.iterdir()) == []


# --- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["bench", "--set", "resnet99"], ["resnet99", "resnet18"]),
        (["bench", "--providers", "static,cudnn"], ["'cudnn'", "'auto'", "'native'"]),
        (["bench", "--dtype", "fp8"], ["'fp8'", "bf16"]),
        (["bench", "--layout", "nhwc"], ["'nhwc'", "channels_last"]),
        (["bench", "--batch", "0"], ["--batch", "'0'"]),
        (["bench", "--shape", "cin=64,cout=64"], ["hw", "cin=64,cout=64"]),
        (["bench", "--shape", "cin=64,cout=64,hw=8,k=3,groups=5"], ["groups=5", "divide"]),
        (["bench", "--preset", "huge"], ["'huge'", "quick"]),
        (["sweep", "--set", "vgg"], ["'vgg'", "mobilenetv2"]),
        (["sweep", "--dtype", "int8"], ["'int8'", "fp16"]),
        (["sweep", "--kernels", "conv_fwd,conv3d"], ["'conv3d'", "conv_fwd"]),
    ],
)
def test_bad_arguments_give_a_clear_error(capsys, argv, needles):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    for needle in needles:
        assert needle in err, err


def test_report_on_a_non_bench_csv_is_an_error(capsys, tmp_path):
    path = tmp_path / "bench_other.csv"
    path.write_text("a,b\n1,2\n")
    code, _, err = run_cli(capsys, "report", str(path))
    assert code == 2
    assert "not a bench CSV" in err and "device_slug" in err


# --- shape sets --------------------------------------------------------------------------------


def test_shape_sets_have_the_networks_conv_counts():
    # ResNet-18: 20 convs; ResNet-50: 53; MobileNetV2: 52 (stem, 17 blocks, final 1x1).
    counts = {name: sum(s.count for s in shapes) for name, shapes in SHAPE_SETS.items()}
    assert counts == {"resnet18": 20, "resnet50": 53, "mobilenetv2": 52}
    last = get_shape_set("resnet18")[-1]
    assert (last.cin, last.cout, last.h, last.ho, last.kh) == (512, 512, 7, 7, 3)
    depthwise = [s for s in get_shape_set("mobilenetv2") if s.groups > 1]
    assert all(s.groups == s.cin == s.cout for s in depthwise) and len(depthwise) == 10


def test_parse_shape_defaults_and_tiny():
    shape = parse_shape("cin=64,cout=128,hw=56,k=3,stride=2")
    assert (shape.padding, shape.ho, shape.groups) == (1, 28, 1)
    small = tiny(get_shape_set("mobilenetv2")[1])  # depthwise 32 @112
    assert small.groups == small.cin == small.cout == 8 and small.h == 6


# --- a tiny bench and its report ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """Run ``bench --preset tiny`` once (about 10-20 s on 2 cores) and return its CSV path."""
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["bench", "--preset", "tiny", "--rounds", "2", "--no-progress", "--out",
                     str(out)])
    assert code == 0
    path = out / "cpu" / "bench_tiny.csv"
    assert path.is_file()
    return path


def test_tiny_bench_writes_every_provider_and_mode(tiny_bench):
    with open(tiny_bench) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    seen = {(r["provider"], r["mode"]) for r in rows}
    # the tiny preset has no layers group: the providers of one group (timm) do not run
    assert seen == {(p, m) for p in DEFAULT_PROVIDERS if p not in PROVIDER_GROUPS for m in MODES}
    for row in rows:
        assert row["device"] == "cpu" and row["torch"]
        assert row["commit"] and (row["commit"] == "unknown"
                                  or row["commit"].removesuffix("-dirty").isalnum())
        if row["provider"] == "triton":
            assert row["status"] == "skipped" and "CUDA" in row["note"]
            continue
        assert row["status"] == "ok", row
        assert float(row["time_ms"]) > 0 and float(row["static_time_ms"]) > 0
        assert float(row["ratio_to_static"]) > 0
    memory = [r for r in rows if r["mem_method"]]
    # fresh-process peak RSS for the forward+backward of each runnable provider, one case
    assert {r["provider"] for r in memory} == {"static", "loop", "grouped", "auto"}
    assert all(r["mode"] == "fwd+bwd" and float(r["peak_mem_bytes"]) > 2**20 for r in memory)
    assert all(float(r["mem_extra_bytes"]) >= 0 for r in memory)


def test_report_renders_pngs_and_summary(capsys, tiny_bench, tmp_path):
    code, out, _ = run_cli(capsys, "report", str(tiny_bench.parent.parent), "--out",
                           str(tmp_path))
    assert code == 0
    folder = tmp_path / "cpu"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["tiny_memory_vs_batch.png", "tiny_ratio_vs_axis.png",
                    "tiny_throughput_vs_batch.png"]
    for name in pngs:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    summary = (folder / "summary.md").read_text()
    assert "Preset `tiny`" in summary and "Batch sweep" in summary
    assert "auto ratio" in summary and "dynconv ratio" not in summary
    assert "`triton`: skipped" in summary
    assert f"report: wrote {folder / 'summary.md'}" in out


def test_report_in_place_next_to_the_csv(capsys, tiny_bench):
    code, _, _ = run_cli(capsys, "report", str(tiny_bench))
    assert code == 0
    assert (tiny_bench.parent / "summary.md").is_file()
    assert os.path.isfile(tiny_bench.parent / "tiny_throughput_vs_batch.png")


def test_report_reads_the_old_provider_name(tiny_bench, tmp_path):
    from dynconv.autotune import report

    old = tmp_path / "bench_tiny.csv"
    old.write_text(tiny_bench.read_text().replace(",auto,", ",dynconv,"))
    assert ",dynconv," in old.read_text()
    providers = set(report.load(str(old))["provider"])
    assert "auto" in providers and "dynconv" not in providers


# --- ODConv: the published formulation, the odconv group and its report ------------------------


@pytest.mark.parametrize("shape", [
    "cin=6,cout=8,hw=7,k=3,name=dense",
    "cin=6,cout=6,hw=7,k=3,stride=2,groups=6,name=depthwise",
    "cin=6,cout=4,h=8,w=7,k=3,padding=2,dilation=2,groups=2,name=grouped",
    "cin=4,cout=6,hw=5,k=1,stride=2,padding=0,name=pointwise",
])
def test_odconv_published_equals_the_library_in_float64(shape):
    """The baseline provider (ODConv's published formulation) and dynamic_conv2d with the
    three scales on backend loop: the same y and the same gradients of all seven inputs, in
    float64, on the same tensors (odconv_scales adds them to the case's inputs once)."""
    from dynconv.autotune import bench

    case = bench.Case(bench.ODCONV_GROUP, parse_shape(shape), 3)
    inputs = {k: v.detach().double().requires_grad_(True)
              for k, v in bench.make_inputs(case, "cpu").items()}
    published, leaves = bench.forward_fn(bench.ODCONV_PUBLISHED, case, inputs)
    library, same = bench.forward_fn("odconv_loop", case, inputs)
    assert all(a is b for a, b in zip(leaves, same)) and len(leaves) == 7
    assert inputs["tap_scale"].shape == (3, case.shape.kh, case.shape.kw)
    assert all(bool((inputs[n] > 0).all()) for n in ("in_scale", "out_scale", "tap_scale"))
    want, got = published(), library()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, grad),
                    torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_odconv_providers_run_on_the_odconv_group_only():
    from dynconv.autotune import bench

    odconv = bench.preset_cases("odconv", "cpu")
    layers = [c for c in bench.preset_cases("quick", "cpu") if c.group == "layers"]
    # make report's layers at its batch, with peak memory; none in the quick preset
    assert [(c.shape, c.batch) for c in odconv] == [(c.shape, c.batch) for c in layers]
    assert all(c.group == bench.ODCONV_GROUP and c.memory and c.timing for c in odconv)
    assert not any(c.group == bench.ODCONV_GROUP for p in ("quick", "tiny", "gpu")
                   for c in bench.preset_cases(p, "cpu"))
    applies = lambda case: [p for p in bench.PROVIDERS if bench.provider_applies(p, case)]
    assert applies(odconv[0]) == ["static", *bench.ODCONV_PROVIDERS]
    assert not set(bench.ODCONV_PROVIDERS) & set(applies(layers[0]))
    assert {"odconv_published", "odconv_auto"} <= set(DEFAULT_PROVIDERS)
    assert not {"odconv_loop", "odconv_grouped", "odconv_native"} & set(DEFAULT_PROVIDERS)


def test_odconv_tiny_bench_writes_its_own_csv_and_report(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "--preset", "odconv-tiny", "--rounds", "1",
                           "--modes", "fwd,fwd+bwd", "--no-progress", "--out", str(tmp_path))
    assert code == 0
    path = tmp_path / "cpu" / "odconv.csv"
    assert f"bench: wrote {path}" in out
    assert _files(tmp_path) == ["cpu/odconv.csv"]  # not a bench_*.csv: no clash, no search
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("static", "odconv_published", "odconv_auto") for m in ("fwd", "fwd+bwd")}
    assert {r["group"] for r in rows} == {"odconv"} and {r["status"] for r in rows} == {"ok"}
    assert all(float(r["ratio_to_static"]) > 0 for r in rows)
    memory = [r for r in rows if r["mem_method"]]
    assert {(r["provider"], r["mode"]) for r in memory} == {
        (p, "fwd+bwd") for p in ("static", "odconv_published", "odconv_auto")}
    code, out, _ = run_cli(capsys, "report", str(path))
    assert code == 0 and f"report: wrote {tmp_path / 'cpu' / 'odconv.md'}" in out
    text = (tmp_path / "cpu" / "odconv.md").read_text()
    assert "## ODConv: the library's scales against the published formulation" in text
    assert "| `odconv_published` |" in text and "| `odconv_auto` |" in text
    assert "the router (ODConv's attention branch) is not timed" in text
    assert _files(tmp_path) == ["cpu/odconv.csv", "cpu/odconv.md"]


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, names in os.walk(folder) for f in names)


# --- the interpreter sweep: write a table, the next launch uses it -----------------------------

TINY_LAYER = "cin=8,cout=8,hw=5,k=3,name=tiny"

# Run in a fresh process (the "next launch"): the forward kernel is launched through the public
# API and the wrapper reports where its config came from. If the kernel module has no tuned-table
# hook yet, the hook is applied here the way the one-line hook does it.
LOAD_SCRIPT = r"""
import json, os, sys, warnings
import torch
import dynconv
from dynconv.autotune.sweep import KERNELS, hooked_kernel
from dynconv.kernels import tuned_table

kernel, _ = hooked_kernel(KERNELS["conv_fwd"])
torch.manual_seed(0)
x = torch.randn(2, 8, 5, 5)
bank = torch.randn(4, 8, 8, 3, 3) * 0.1
bias = torch.randn(4, 8) * 0.1
routing = torch.softmax(torch.randn(2, 4), dim=1)

from dynconv.backends.triton import strategy

def launch():
    # the kernel's config source, with the premix forward (conv_fwd's) asked for by name
    with torch.no_grad(), dynconv.use_strategy(forward="premix"):
        y = dynconv.dynamic_conv2d(x, bank, routing, bias, padding=1, backend="triton")
    ref = dynconv.dynamic_conv2d(x, bank, routing, bias, padding=1, backend="native")
    return {"source": kernel.last_source, "key": kernel.last_key, "config": kernel.last_config,
            "max_error": float((y - ref).abs().max())}

with torch.no_grad():
    dynconv.dynamic_conv2d(x, bank, routing, bias, padding=1, backend="triton")
result = {"auto": strategy.last_choice["forward"], "tuned": launch()}
os.environ["DYNCONV_TUNED"] = "0"
tuned_table.clear_cache()
result["disabled"] = launch()
del os.environ["DYNCONV_TUNED"]
os.environ["DYNCONV_TUNED_DIR"] = sys.argv[1]
tuned_table.clear_cache()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result["stale"] = launch()
result["stale"]["warnings"] = [str(w.message) for w in caught]
print(json.dumps(result))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNCONV_TUNED")}
    env["TRITON_INTERPRET"] = "1"
    env.update(extra)
    return env


def test_sweep_dry_run_lists_kernels_and_shapes(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "sweep", "--set", "mobilenetv2", "--batch", "8", "--dtype",
                           "fp16", "--dry-run", "--table-dir", str(tmp_path), "--interpreter")
    assert code == 0
    assert "conv_fwd" in out and "candidate configs" in out
    assert "features.2.depthwise" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_sweep_without_a_gpu_refuses_and_writes_nothing(capsys, tmp_path, monkeypatch):
    """Without a GPU the sweep says so and how to try the interpreter on purpose (exit 2); with
    --interpreter its default output is the user's cache folder, never the package tree."""
    from dynconv.kernels import tuned_table

    monkeypatch.delenv("DYNCONV_TUNED_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package = sorted(os.listdir(tuned_table.package_dir()))
    code, out, err = run_cli(capsys, "sweep", "--shape", TINY_LAYER, "--batch", "2")
    assert code == 2
    assert "no CUDA GPU found" in err and "--interpreter" in err
    code, out, err = run_cli(capsys, "sweep", "--shape", TINY_LAYER, "--batch", "2",
                             "--dry-run", "--interpreter")
    assert code == 0
    assert f"would write {tmp_path / 'cache' / 'dynconv' / 'tuned' / 'interpreter.json'}" in out
    assert sorted(os.listdir(tuned_table.package_dir())) == package
    assert not (tmp_path / "cache").exists()


def test_interpreter_sweep_writes_a_table_the_next_launch_uses(tmp_path):
    import json

    table_dir = tmp_path / "tuned"
    sweep = subprocess.run(
        [sys.executable, "-m", "dynconv.autotune", "sweep", "--shape", TINY_LAYER, "--batch",
         "2", "--dtype", "fp32", "--layout", "nchw", "--kernels", "conv_fwd", "--reps", "1",
         "--no-progress", "--out", str(table_dir), "--interpreter"],
        capture_output=True, text=True, timeout=300, env=_env())
    assert sweep.returncode == 0, sweep.stderr
    assert "tuning miniature shapes under Triton's interpreter" in sweep.stderr
    path = table_dir / "interpreter.json"
    table = json.loads(path.read_text())
    assert table["device"] == "Triton interpreter (CPU)" and table["triton"] and table["torch"]
    # the strategy choices beside the configs: every strategy timed, the fastest named
    from dynconv.backends.triton.strategy import BACKWARD_STRATEGIES, FORWARD_STRATEGIES

    for kind, names in (("forward", FORWARD_STRATEGIES), ("backward", BACKWARD_STRATEGIES)):
        (key, entry), = table["strategies"][kind].items()
        assert key.startswith("B2 C8x5x5 O8 k3x3 s1x1 p1x1 d1x1 g1 K4 fp32 nchw bias")
        assert set(entry["ms"]) == set(names) - {"premix_tma"}  # no TMA on NCHW fp32
        measured = {n: ms for n, ms in entry["ms"].items() if isinstance(ms, float)}
        assert entry["strategy"] == min(measured, key=measured.get)
    entries = table["kernels"]["conv_fwd"]
    assert {e["variant"] for e in entries.values()} == {"premix", "fused"}
    for entry in entries.values():
        assert entry["ms"] > 0 and entry["config"]["kwargs"]["BLOCK_M"] >= 16
        assert all(isinstance(v, float) or v.startswith(("failed", "wrong")) for v in
                   entry["timings_ms"].values())

    # a copy claiming another Triton version must be ignored with a warning
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir()
    (stale_dir / "interpreter.json").write_text(json.dumps({**table, "triton": "2.0.0"}))

    load = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(stale_dir)],
                          capture_output=True, text=True, timeout=300,
                          env=_env(DYNCONV_TUNED_DIR=str(table_dir)))
    assert load.returncode == 0, load.stderr
    result = json.loads(load.stdout.strip().splitlines()[-1])
    # auto takes the table's measured strategy for the key
    (key, entry), = table["strategies"]["forward"].items()
    assert result["auto"] == [key, entry["strategy"], "table"]
    tuned = result["tuned"]
    assert tuned["source"] == "table"
    assert tuned["config"] == entries[tuned["key"]]["config"]
    assert tuned["max_error"] < 1e-4
    assert result["disabled"]["source"] == "autotune"
    assert result["stale"]["source"] == "autotune"
    assert any("Triton '2.0.0'" in w for w in result["stale"]["warnings"])


# --- gpu-check ---------------------------------------------------------------------------------


def test_gpu_check_step_runner_reports_ok_failure_and_timeout(tmp_path):
    from dynconv.autotune.gpu_check import Log, Step, run_step

    log = Log(str(tmp_path / "check.log"))
    steps = [
        Step("ok", [sys.executable, "-c", "print('hello from a step')"], 60),
        Step("fails", [sys.executable, "-c", "import sys; sys.exit(3)"], 60),
        Step("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 1),
        Step("skipped", ["true"], 60, skip_reason="no GPU"),
    ]
    for step in steps:
        run_step(step, log)
    log.close()
    assert [s.status for s in steps] == ["ok", "failed (exit code 3)", "timed out after 1 s",
                                         "skipped: no GPU"]
    assert steps[2].seconds < 30
    assert "hello from a step" in (tmp_path / "check.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the real check")


def test_tuned_table_trusts_only_its_own_device_and_triton(tmp_path):
    import json
    import warnings

    import triton

    from dynconv.kernels import tuned_table

    good = {"format": 1, "device": "NVIDIA H200", "triton": triton.__version__, "kernels": {}}
    assert tuned_table.check_table(good, "NVIDIA H200", "t.json") is None
    assert "tuned on 'NVIDIA H200'" in tuned_table.check_table(good, "NVIDIA A100", "t.json")
    older = {**good, "triton": "2.3.1"}
    assert "Triton '2.3.1'" in tuned_table.check_table(older, "NVIDIA H200", "t.json")
    assert "format-1" in tuned_table.check_table({"format": 0}, "NVIDIA H200", "t.json")

    (tmp_path / "nvidia_h200.json").write_text(json.dumps({**good, "device": "NVIDIA A100"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuned_table.load_table("nvidia_h200", "NVIDIA H200", str(tmp_path)) is None
    assert any("ignoring tuned table" in str(w.message) for w in caught)
    (tmp_path / "nvidia_h200.json").write_text(json.dumps(good))
    assert tuned_table.load_table("nvidia_h200", "NVIDIA H200", str(tmp_path)) == good
