"""``python -m dynconv.autotune gpu-check`` on the CPU: the plan and its budget (launch capture
for sm_90, in a subprocess: it needs Triton's compiler, this process runs its interpreter), the
path shim that runs it without an install, the precompile pool (what it compiles is what a launch
reads from Triton's cache; a compiler crash is pinned on its job), the correctness pass and the
timings on miniatures under the interpreter, the deadline, and a killed run's CSV."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest
import torch
from helpers import env_without_interpreter

from dynconv.autotune import bench, gpu_check, gpu_steps
from dynconv.autotune.measure import Timer
from dynconv.autotune.shapes import ConvShape, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, names in os.walk(folder) for f in names)


# --- the plan ------------------------------------------------------------------------------------


def test_dry_run_plan_fits_seven_minutes(tmp_path):
    """The plan's compiles (captured for sm_90 with the pinned configs) at 3 s each over 16
    compilers, plus its estimated run time, fit the 420 s deadline; nothing is written."""
    run = subprocess.run(
        [sys.executable, "-m", "dynconv.autotune", "gpu-check", "--dry-run", "--arch", "90",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env_without_interpreter(), cwd=ROOT, timeout=300,
        check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    budget = dict(item.split("=") for item in
                  next(line for line in out.splitlines() if line.startswith("budget:")).split()[1:])
    compiles, total = int(budget["compiles"]), float(budget["total_s"])
    assert compiles > 50
    assert float(budget["compile_s"]) == pytest.approx(
        gpu_check.POOL_START_S + compiles * 3.0 / 16, abs=0.1)
    assert total == pytest.approx(float(budget["compile_s"]) + float(budget["run_s"]), abs=0.2)
    assert float(budget["deadline_s"]) == 420 and total <= 420 and budget["fits"] == "yes"
    assert "launches captured for sm_90" in out
    for needle in ("[1] precompile:", "[2] correctness: 71 cases", "[3] timings: 15 cases",
                   "[4] sweep", "[5] tests", "512->512 k3 s1 @7", "64->64 k3 s1 @56",
                   "128->256 k3 s2 @28", "128->256 k1 s2 @28", "K17", "K1 ", "dw ", "3->16 k7 s2",
                   "nchw", "fp16", "fused", "premix", "spanning", "premix_tma",
                   "bwd=spanning_torch", "triton-bwd_spanning", "pinning pass:",
                   "B3 K4 bf16 cl premix odconv", "fp32 nchw premix odconv",
                   "odconv       layer4.0.conv2",
                   "providers static,odconv_published,odconv_auto, no profiles",
                   "pruned per launch, preferring 128x128x32x8x3"):
        assert needle in out, needle
    assert list(tmp_path.iterdir()) == []


def test_dry_run_under_the_interpreter_lists_the_steps(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "unknown (TRITON_INTERPRET=1" in out and "budget: unknown" in out
    assert "pytest test_triton_backward.py" in out and "[4] sweep" in out
    assert list(tmp_path.iterdir()) == []


def test_cases_cover_the_issue():
    checks = gpu_steps.check_cases()
    assert 60 <= len(checks) <= 72
    assert {c.dtype for c in checks} == {"bf16", "fp16", "fp32"}
    assert {c.layout for c in checks} == {"channels_last", "nchw"}
    assert {c.strategy for c in checks} == set(gpu_steps.FORWARD_STRATEGIES)
    assert {c.backward for c in checks} == {"per_sample", "spanning_torch"}
    # the batch-spanning backward on every geometry, each dtype and layout, and at scale
    by_torch = [c for c in checks if c.backward == "spanning_torch"]
    assert {c.dtype for c in by_torch} == {"bf16", "fp16", "fp32"}
    assert {c.layout for c in by_torch} == {"channels_last", "nchw"}
    assert {c.shape.name for c in checks if c.batch < 16 and c.strategy != "premix_tma"
            and c.shape.spatial_dims == 2} <= {
        c.shape.name for c in by_torch}
    assert any(c.batch == 32 and c.strategy != "spanning_torch" for c in by_torch)
    tma = [c for c in checks if c.strategy == "premix_tma"]
    # every TMA case is one the strategy can run (on a GPU of capability 9.0)
    assert {c.dtype for c in tma} == {"bf16", "fp16"} and {c.layout for c in tma} == {
        "channels_last"}
    assert all(c.shape.stride == 1 and c.shape.groups == 1 and c.shape.cin % 8 == 0
               and c.shape.cout % 8 == 0 for c in tma)
    assert {17, 4} <= {c.experts for c in tma} and any(c.shape.dilation > 1 for c in tma)
    spanning = [c for c in checks if c.strategy == "spanning"]
    assert {c.dtype for c in spanning} == {"bf16", "fp16", "fp32"}
    assert {c.layout for c in spanning} == {"channels_last", "nchw"}
    assert {1, 17} <= {c.experts for c in checks}
    shapes = {(s.kh, s.stride, s.groups > 1, s.cin) for s in (c.shape for c in checks)}
    assert {(3, 1, False, 16), (3, 2, False, 16), (1, 2, False, 32), (7, 2, False, 3)} <= shapes
    assert any(c.shape.groups == c.shape.cin > 1 for c in checks)  # depthwise
    assert any(1 < c.shape.groups < c.shape.cin for c in checks)  # grouped
    timed = gpu_steps.timing_cases()
    first = [c for c in timed if c.group == "b32-bf16-cl"]
    assert [c.shape.label() for c in first[:4]] == [
        "512->512 k3 s1 @7", "256->256 k3 s1 @14", "128->128 k3 s1 @28", "64->64 k3 s1 @56"]
    assert {(c.batch, c.dtype, c.layout) for c in first} == {(32, "bf16", "channels_last")}
    assert {c.group for c in timed} == {"b32-bf16-cl", "nchw", "fp32", "b128", "1d-3d",
                                        bench.ODCONV_GROUP}
    # ODConv: checked (triton with the scales against the published formulation) and timed
    # (the library's against the published formulation and static), a couple of each
    odconv = [c for c in checks if c.odconv]
    assert len(odconv) == 2 and {c.dtype for c in odconv} == {"bf16", "fp32"}
    assert all(c.label.endswith(" odconv") for c in odconv)
    timed_odconv = [c for c in timed if c.group == bench.ODCONV_GROUP]
    assert [c.shape.name for c in timed_odconv] == list(gpu_steps.ODCONV_TIMED_LAYERS)
    assert all(gpu_steps.case_providers(c) == gpu_steps.ODCONV_TIMING_PROVIDERS
               for c in timed_odconv)
    assert gpu_steps.case_providers(first[0]) == gpu_steps.TIMING_PROVIDERS
    assert [c.odconv for c in gpu_steps.check_cases(tiny_shapes=True)].count(True) == 1
    assert [c.group for c in gpu_steps.timing_cases(True)].count(bench.ODCONV_GROUP) == 1
    # the 1-D and 3-D front ends, checked and timed (against F.conv1d / F.conv3d)
    assert {c.shape.spatial_dims for c in checks} == {1, 2, 3}
    assert {c.shape.spatial_dims for c in timed} == {1, 2, 3}


def test_tma_provider_only_where_tma_can_run(monkeypatch):
    """gpu-check times and profiles triton-premix_tma only on TMA-eligible cases (elsewhere it
    would only record errors); without a GPU or the interpreter it is never eligible."""
    from dynconv.kernels import _common

    eligible = bench.Case("g", ConvShape("s", 16, 32, 9, 9, 3, 3, 1, 1), 2, 4, "bf16",
                          "channels_last")
    strided = bench.Case("g", ConvShape("s2", 16, 32, 9, 9, 3, 3, 2, 1), 2, 4, "bf16",
                         "channels_last")
    nchw = bench.Case("g", eligible.shape, 2, 4, "bf16", "nchw")
    fp32 = bench.Case("g", eligible.shape, 2, 4, "fp32", "channels_last")
    tma = "triton-premix_tma"
    providers = gpu_steps.TIMING_PROVIDERS
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
    assert tma not in gpu_steps.providers_for(eligible, providers, "cpu")
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: True)
    assert gpu_steps.providers_for(eligible, providers, "cpu") == list(providers)
    for case in (strided, nchw, fp32):
        kept = gpu_steps.providers_for(case, providers, "cpu")
        assert kept == [p for p in providers if p != tma], case


def test_pinned_configs_are_the_kernels_own_pruned_choices():
    """Every kernel is pinned by a choice made per launch: the first preferred tile among the
    candidates that the kernel's own prune keeps for that launch (so no pin is a config the
    autotuner would have pruned: a spilling fp32 tile, a TMA box past the image), else the
    prune's first; the preferences follow the problem's size and name real candidates."""
    from dynconv.kernels import configs

    wide = ConvShape("w", 128, 256, 28, 28, 3, 3, 1, 1)
    narrow = ConvShape("n", 64, 64, 7, 7, 3, 3, 1, 1)
    for shape, tile in ((wide, gpu_steps.BIG_TILE), (narrow, gpu_steps.SMALL_TILE)):
        pins = gpu_steps.pinned_configs(shape, 4, "bf16")
        assert set(pins) == set(gpu_steps.TRITON_KERNELS)
        assert all(isinstance(p, gpu_steps.PrunedChoice) for p in pins.values())
        assert pins["conv_fwd"].preferences[0] == tile
        assert pins["conv_bwd_dx"].preferences[0] == tile
        assert "pruned per launch" in gpu_steps.config_text(pins["conv_fwd"])
    full = configs.conv_fwd_configs(interpreter=False)
    by_tile = {gpu_steps._tile_of(c): c for c in full}
    small, big = by_tile[gpu_steps.SMALL_TILE], by_tile[gpu_steps.BIG_TILE]
    keep = {"both": [small, big], "small": [small], "neither": [c for c in full
                                                               if c not in (small, big)]}
    for kept, want in (("both", big), ("small", small), ("neither", keep["neither"][0])):
        choice = gpu_steps.PrunedChoice(full, lambda cs, named, _kept=kept, **kw: keep[_kept],
                                        [gpu_steps.BIG_TILE, gpu_steps.SMALL_TILE])
        assert choice({}, {}) is want
    # Every preferred tile is one of the kernels' candidates (not a stale name).
    for preferences, candidates in (
            (gpu_steps.DW_PREFERENCE, configs.conv_bwd_dw_configs(interpreter=False)),
            ((gpu_steps.BIG_TILE, gpu_steps.SMALL_TILE), full),
            ((gpu_steps.MIX_TILE,), configs.mix_configs(interpreter=False)),
            (gpu_steps.SPANNING_PREFERENCE,
             configs.conv_fwd_spanning_configs(interpreter=False)),
            (gpu_steps.TMA_PREFERENCE, configs.conv_fwd_tma_configs(interpreter=False))):
        assert set(preferences) <= {gpu_steps._tile_of(c) for c in candidates}


# --- running without an install ------------------------------------------------------------------


def test_the_tree_runs_without_an_install(tmp_path):
    """With the editable install hidden (the base interpreter, the venv's site-packages on
    PYTHONPATH: no .pth runs, so no install finder): from the tree's root, ``python -m
    dynconv.autotune gpu-check`` imports dynconv.kernels and dynconv.autotune from the tree (the
    package maps them itself); from elsewhere, the path shim does, and ``python
    autotune/gpu_check.py`` re-runs itself under it."""
    base = getattr(sys, "_base_executable", sys.executable)
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONNOUSERSITE": "1", "PYTHONPATH": site}
    probe = ("import sys, dynconv.kernels.conv_fwd, dynconv.autotune.bench; "
             "print(dynconv.kernels.conv_fwd.__file__); print(dynconv.autotune.bench.__file__); "
             "print(any('editable' in repr(f).lower() for f in sys.meta_path))")
    want = [os.path.join(ROOT, "kernels", "conv_fwd.py"),
            os.path.join(ROOT, "autotune", "bench.py"), "False"]
    at_root = subprocess.run([base, "-c", probe], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=120, check=False)
    assert at_root.returncode == 0, at_root.stderr[-2000:]
    assert at_root.stdout.split() == want
    command = subprocess.run([base, "-m", "dynconv.autotune", "gpu-check", "--help"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                             check=False)
    assert command.returncode == 0, command.stderr[-2000:]
    assert "usage: python -m dynconv.autotune gpu-check" in command.stdout

    elsewhere = subprocess.run([base, "-c", probe], capture_output=True, text=True, env=env,
                               cwd=tmp_path, timeout=120, check=False)
    assert "No module named 'dynconv'" in elsewhere.stderr
    shim = tmp_path / "shim"
    gpu_check.write_path_shim(str(shim))
    shimmed = {**env, "PYTHONPATH": f"{shim}{os.pathsep}{site}"}
    found = subprocess.run([base, "-c", probe], capture_output=True, text=True, env=shimmed,
                           cwd=tmp_path, timeout=120, check=False)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split() == want
    script = subprocess.run([base, os.path.join(ROOT, "autotune", "gpu_check.py"), "--help"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                            check=False)
    assert script.returncode == 0, script.stderr[-2000:]
    assert "through the path shim" in script.stdout
    assert "usage: python -m dynconv.autotune gpu-check" in script.stdout


# --- pinning: nothing launches on a meta tensor ------------------------------------------------

PINNING_SCRIPT = textwrap.dedent("""
    import json

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from dynconv.autotune import gpu_check, gpu_steps

    launched = []

    def record(kind):
        def launch(self, *args, **kwargs):
            name = getattr(getattr(self, "fn", self), "__name__", repr(self))
            launched.append(f"{kind} {name}")
        return launch

    # a launch recorder in place of every way into a kernel: a GPU would run each on the
    # meta tensors' null pointers
    JITFunction.run, Autotuner.run = record("jit"), record("autotune")
    plan = gpu_check.Plan.build(False)
    strategies = {s for launch in plan.launches for s in launch.strategies}
    error = None
    try:
        entries = gpu_check.pinning_pass(plan, 90)
    except Exception as exc:
        entries, error = {}, f"{type(exc).__name__}: {exc}"
    print(json.dumps({"launched": launched, "error": error, "strategies": sorted(strategies),
                      "backward": all(launch.backward for launch in plan.launches),
                      "launches": len(plan.launches), "checks": len(plan.checks),
                      "timings": len(plan.timings),
                      "entries": {k: len(v) for k, v in entries.items()}}))
""")


def test_pinning_launches_nothing_and_pins_every_kernel(tmp_path):
    """The pinning pass drives every strategy's forward and the backward of every checked and
    timed case on meta tensors (as on a GPU: Triton's compiler, not its interpreter, in a
    subprocess) with a recorder in place of every launch: nothing may launch, and every Triton
    kernel of the backend gets a pinned config (so nothing autotunes at run time either)."""
    script = tmp_path / "pinning.py"
    script.write_text(PINNING_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env_without_interpreter(), cwd=ROOT, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result["error"]
    assert result["launched"] == []
    assert result["strategies"] == sorted(gpu_steps.FORWARD_STRATEGIES)
    assert result["backward"] and result["launches"] == result["checks"] + result["timings"]
    assert set(result["entries"]) == set(gpu_steps.TRITON_KERNELS)
    assert all(n > 0 for n in result["entries"].values()), result["entries"]


def test_pinning_refuses_a_kernel_without_a_pinned_config(monkeypatch):
    """A kernel left unpinned would go to its autotuner (which benchmarks on the inputs): the
    pinning pass raises instead of launching it (here under the interpreter, on CPU tensors)."""
    launches = [gpu_steps.Launches(tiny(ConvShape("t", 8, 8, 6, 6, 3, 3, 1, 1), 6, 6), 2, 4,
                                   "bf16", True, True, ("spanning",), backward=False)]
    assert gpu_steps.pinned_entries(launches, "cpu")["conv_fwd_spanning"]
    pins = gpu_steps.pinned_configs
    monkeypatch.setattr(gpu_steps, "pinned_configs", lambda *a: {
        k: v for k, v in pins(*a).items() if k != "conv_fwd_spanning"})
    with pytest.raises(gpu_steps.RealLaunchError, match="conv_fwd_spanning_kernel"):
        gpu_steps.pinned_entries(launches, "cpu")


# --- precompiling -------------------------------------------------------------------------------

PRECOMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile

    from dynconv.autotune import gpu_check, gpu_steps
    from dynconv.autotune.launch_capture import CompileJob
    from dynconv.autotune.shapes import ConvShape


    class TargetOnly:  # a driver that knows the GPU target and nothing else
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            from triton.backends.compiler import GPUTarget
            return GPUTarget("cuda", 90, 32)


    def main():
        shape = ConvShape("t", 16, 32, 9, 9, 3, 3, 1, 1)
        launches = [gpu_steps.Launches(shape, 3, 4, "bf16", True, True, ("fused",))]
        jobs = [j for js in gpu_steps.compile_jobs(launches, 90) for j in js]
        crash = CompileJob(module=sys.argv[1], kernel="k", arch=90, signature={},
                           constexprs={}, attrs={}, options={"num_warps": 4, "num_stages": 3},
                           labels=["a job whose compiler process dies"])
        rows = []
        pool = gpu_check.Precompiler(2, rows.append, lambda text: print(text, file=sys.stderr))
        pool.submit([crash] + jobs)
        done = pool.wait([crash] + jobs, gpu_check.Deadline(400))
        failures = pool.failures([crash] + jobs)
        pool.close()

        # Now launch as a GPU would: the pinned table, JITFunction.run (in warmup mode: it
        # compiles, it does not launch) for an sm_90 target, and count the compiles.
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        from dynconv.kernels import tuned_table

        folder = tempfile.mkdtemp()
        gpu_steps.write_pinned_table(gpu_steps.pinned_entries(launches, "meta"), "meta", folder)
        os.environ["DYNCONV_TUNED_DIR"] = folder
        tuned_table.clear_cache()
        driver.set_active(TargetOnly())
        run = JITFunction.run
        JITFunction.run = lambda self, *a, grid, warmup, **kw: run(self, *a, grid=grid,
                                                                    warmup=True, **kw)
        events = []
        knobs.compilation.listener = lambda *, src, cache_hit, **_: events.append(cache_hit)
        gpu_steps.config_sources(reset=True)
        gpu_steps._drive(launches[0], "meta")
        print(json.dumps({"done": done, "rows": rows, "jobs": len(jobs), "events": events,
                          "failures": failures, "sources": gpu_steps.config_sources()}))


    if __name__ == "__main__":
        main()
""")


def test_precompiled_kernels_are_what_launches_read_and_a_crash_is_pinned_on_its_job(tmp_path):
    """Jobs compiled in the pool are Triton cache hits for JITFunction.run's own compile of
    the same launches (no cold compile); a job whose compiler process dies is named, the
    others still compile, and its cases would be skipped rather than launched."""
    (tmp_path / "crashing_module.py").write_text("import os\nos.abort()\n")
    script = tmp_path / "precompile.py"
    script.write_text(PRECOMPILE_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), "crashing_module"], capture_output=True, text=True,
        env=env_without_interpreter(
            TRITON_CACHE_DIR=str(tmp_path / "cache"),
            PYTHONPATH=os.pathsep.join(
                p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)),
        cwd=ROOT, timeout=500, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["done"]
    by_kernel = {row["kernel"]: row for row in result["rows"]}
    assert by_kernel["k"]["status"] == "the compiler crashed (its process died)"
    assert {row["status"] for row in result["rows"] if row["kernel"] != "k"} <= {"ok"}
    assert {"conv_fwd", "conv_bwd_dx", "conv_bwd_dw"} <= set(by_kernel)
    assert len(result["rows"]) == result["jobs"] + 1
    assert result["failures"] and "crashed" in result["failures"][0]
    assert result["events"] and all(result["events"]), "a launch compiled cold"
    assert len(result["events"]) == result["jobs"]
    assert set(result["sources"].split()) == {"conv_fwd:table", "conv_bwd_dx:table",
                                              "conv_bwd_dw:table"}


# --- the steps on miniatures under the interpreter -----------------------------------------------


@pytest.fixture
def pinned_table(tmp_path, monkeypatch):
    """Use gpu-check's pinned table for the given launches (interpreter keys), then forget it."""
    from dynconv.kernels import tuned_table

    def use(launches):
        folder = tmp_path / "pinned"
        gpu_steps.write_pinned_table(gpu_steps.pinned_entries(launches, "cpu"), "cpu",
                                     str(folder))
        monkeypatch.setenv("DYNCONV_TUNED_DIR", str(folder))
        tuned_table.clear_cache()

    yield use
    tuned_table.clear_cache()


def test_correctness_pass_on_the_interpreter(pinned_table, monkeypatch):
    cases = [c for c in gpu_steps.check_cases(tiny_shapes=True)
             if c.shape.name in ("grouped", "stem-7x7-s2")]
    assert {c.experts for c in cases} == {4, 1}
    pinned_table([gpu_steps.launches_of_check(c) for c in cases])
    for case in cases:
        rows = gpu_steps.run_check(case, "cpu")
        assert [r["tensor"] for r in rows] == ["y", "grad_x", "grad_bank", "grad_routing",
                                               "grad_bias"]
        assert {r["status"] for r in rows} == {"ok"}, rows
        assert all(0 <= float(r["worst_error_over_bound"]) <= 1 for r in rows)
        assert set(rows[0]["config_sources"].split()) >= {"conv_fwd:table",
                                                          "conv_bwd_dx:table",
                                                          "conv_bwd_dw:table"}
    # a result outside its bound is a FAIL row, not an exception
    monkeypatch.setattr(gpu_steps, "relative_tolerance", lambda *args: 0.0)
    monkeypatch.setattr(gpu_steps, "ATOL", 1e-30)
    assert "FAIL" in {r["status"] for r in gpu_steps.run_check(cases[0], "cpu")}


def test_timings_and_kernel_profile_on_the_interpreter():
    case = bench.Case("t", tiny(ConvShape("t", 8, 8, 6, 6, 3, 3, 1, 1), 4, 5), 2, 4, "bf16",
                      "channels_last", memory=False)
    providers = ("static", "grouped", "triton-premix", "triton-fused", "triton-spanning",
                 "spanning-torch")
    rows = gpu_steps.run_timing(case, "cpu", Timer("cpu", min_sample_ms=0.1, max_calls=1),
                                rounds=1, memory=False, providers=providers)
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers
                                                          for m in bench.MODES}
    assert {r["status"] for r in rows} == {"ok"}, [r["note"] for r in rows]
    assert all(r["ratio_to_static"] > 0 for r in rows)
    profile = gpu_steps.profile_kernels(case, "triton-fused", "cpu", iterations=1)
    assert profile and {r["status"] for r in profile} == {"ok"}
    assert all(set(gpu_steps.KERNEL_COLUMNS) >= set(r) for r in profile)


def test_cpu_run_writes_its_files_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNCONV_TUNED_DIR", str(tmp_path / "restored-after"))
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--skip", "timings"])
    folder = tmp_path / "cpu_interpreter"
    files = _files(tmp_path)
    assert code == 0, (folder / "gpu_check.log").read_text()[-3000:]
    assert files == ["cpu_interpreter/correctness.csv", "cpu_interpreter/gpu_check.log",
                     "cpu_interpreter/summary.md"]
    rows = list(csv.DictReader(open(folder / "correctness.csv")))
    assert len({r["case"] for r in rows}) == len(gpu_steps.check_cases(tiny_shapes=True))
    assert {r["status"] for r in rows} == {"ok"}
    assert all(s.endswith(":table") for r in rows for s in r["config_sources"].split())
    summary = (folder / "summary.md").read_text()
    assert "| correctness | ok |" in summary and "| timings | skipped: --skip |" in summary
    assert "0 rows not ok" in summary
    # the ODConv case: y and all seven gradients, the scales' too
    odconv = [r for r in rows if r["case"].endswith(" odconv")]
    assert [r["tensor"] for r in odconv] == ["y", *gpu_steps.GRADIENTS,
                                             *gpu_steps.ODCONV_GRADIENTS]


def test_odconv_timings_on_the_interpreter(tmp_path, monkeypatch):
    """The ODConv timing case: its Triton launches (the bank as the library hands it to the
    backend) are all in the pinned table, whichever forward strategy auto takes; its rows
    (static, the published formulation, the library's) and its summary section."""
    from dynconv.kernels import tuned_table

    case, = [c for c in gpu_steps.timing_cases(True) if c.group == bench.ODCONV_GROUP]
    folder = tmp_path / "pinned"
    gpu_steps.write_pinned_table(
        gpu_steps.pinned_entries([gpu_steps.launches_of_timing(case)], "cpu"), "cpu",
        str(folder))
    monkeypatch.setenv("DYNCONV_TUNED_DIR", str(folder))
    tuned_table.clear_cache()
    try:
        for strategy in ("premix", "fused"):
            gpu_steps.config_sources(reset=True)
            forward, leaves = bench.forward_fn("odconv_triton", case,
                                               bench.make_inputs(case, "cpu"))
            with gpu_steps.forced_strategy(strategy):
                bench.mode_fn("fwd+bwd", forward, leaves)()
            sources = gpu_steps.config_sources().split()
            assert sources and all(s.endswith(":table") for s in sources), (strategy, sources)
    finally:
        tuned_table.clear_cache()
    providers = gpu_steps.case_providers(case)
    rows = gpu_steps.run_timing(case, "cpu", Timer("cpu", min_sample_ms=0.1, max_calls=1),
                                rounds=1, memory=False, providers=providers)
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers
                                                          for m in bench.MODES}
    assert {r["status"] for r in rows} == {"ok"}, [r["note"] for r in rows]
    assert gpu_steps.uses_triton("odconv_auto", "cuda")
    assert not gpu_steps.uses_triton("odconv_auto", "cpu")
    full = [{**bench.case_columns(case), **r} for r in rows]
    lines = gpu_check._timing_lines(full, gpu_steps.ODCONV_TIMING_PROVIDERS)
    assert "| static ms fwd, f+b | odconv_published | odconv_auto |" in lines[2]
    assert lines[-1].startswith("| odconv 8->8 k3 s1 @6 B2 bf16 channels_last |")


def test_deadline_cuts_the_steps_and_the_summary_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNCONV_TUNED_DIR", str(tmp_path / "restored-after"))
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--deadline-s", "1"])
    assert code == 1
    summary = (tmp_path / "cpu_interpreter" / "summary.md").read_text()
    assert "| correctness | cut by the deadline" in summary
    assert "| timings | cut by the deadline" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the real check")
def test_without_a_gpu_every_step_is_skipped(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    text = (tmp_path / "no_gpu" / "gpu_check.log").read_text()
    for step in gpu_check.STEPS:
        assert f"  {step:11s} skipped: torch.cuda.is_available() is False" in text
    assert "summary" in capsys.readouterr().out


def test_a_killed_run_keeps_its_csv(tmp_path):
    """Rows are flushed as they are written: SIGKILL after the first cases leaves a CSV whose
    every row is whole."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dynconv.autotune", "gpu-check", "--device", "cpu", "--out",
         str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env_without_interpreter(TRITON_INTERPRET="1"), cwd=ROOT)
    path = tmp_path / "cpu_interpreter" / "correctness.csv"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if path.exists() and len(path.read_text().splitlines()) >= 11:  # two cases
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) >= 10
    assert all(None not in r and r["status"] in ("ok", "FAIL", "error") for r in rows)


# --- cases in child processes: a dying, hanging or CUDA-breaking case loses only itself -------

FAKE_CHILD = textwrap.dedent("""
    import json, os, sys, time

    from dynconv.autotune.gpu_child import EXIT_CUDA_BROKEN, PREFIX

    def send(message):
        print(PREFIX + json.dumps(message), flush=True)

    # what each case does, by index: 1 dies, 2 hangs, 3 breaks CUDA; the rest are fine
    send({"type": "ready"})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("end"):
            break
        index = command["run"]
        if index == 1:
            os._exit(9)
        if index == 2:
            time.sleep(600)
        send({"type": "compile", "hit": True, "name": "k"})
        send({"type": "rows", "sink": "correctness",
              "rows": [{"case": f"case {index}", "tensor": "y", "status": "ok"}]})
        send({"type": "done", "index": index, "status": "ok", "line": f"  ok case {index}",
              "cuda_ok": index != 3})
        if index == 3:
            sys.exit(EXIT_CUDA_BROKEN)
""")


def test_case_process_outlives_deaths_hangs_and_broken_cuda(tmp_path):
    from dynconv.autotune.gpu_child import CaseProcess

    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    rows, compiles, children, log = [], [], set(), []
    child = CaseProcess("correctness", [], log.append, lambda sink, r: rows.extend(r),
                        lambda hit, name: compiles.append(hit), children)
    child._argv = lambda: [sys.executable, str(script)]
    results = [child.run(index, None, timeout=5, start_timeout=60) for index in range(6)]
    child.close()
    assert [r["status"] if isinstance(r, dict) else r.split(" (")[0] for r in results] == [
        "ok", "its process died", "no result within 5 s: its process was killed", "ok", "ok",
        "ok"]
    assert "exit code 9" in results[1]
    assert child.starts == 4  # the first, after the death, after the hang, after broken CUDA
    assert any("CUDA context broken" in line and "exit code 75" in line for line in log)
    assert [r["case"] for r in rows] == ["case 0", "case 3", "case 4", "case 5"]
    assert compiles == [True] * 4
    assert children == set()


def test_a_run_goes_on_after_a_case_loses_its_process(tmp_path, monkeypatch):
    """The whole correctness step with the fake child: the lost cases are error rows naming
    why, the others ran, and the summary says so."""
    from dynconv.autotune import gpu_child

    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(gpu_child.CaseProcess, "_argv",
                        lambda self: [sys.executable, str(script)])
    monkeypatch.setitem(gpu_check.CASE_LIMIT_S, "correctness", 5.0)
    monkeypatch.setenv("DYNCONV_TUNED_DIR", str(tmp_path / "restored-after"))
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--skip", "timings"])
    assert code == 1
    folder = tmp_path / "cpu_interpreter"
    rows = list(csv.DictReader(open(folder / "correctness.csv")))
    cases = gpu_steps.check_cases(tiny_shapes=True)
    assert len(rows) == len(cases)
    assert [r["status"] for r in rows[:4]] == ["ok", "error", "error", "ok"]
    assert "its process died (exit code 9)" in rows[1]["note"]
    assert "no result within 5 s" in rows[2]["note"]
    summary = (folder / "summary.md").read_text()
    assert "| correctness | FAIL |" in summary and "2 lost their process" in summary


WATCHDOG_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    from dynconv.autotune import gpu_check

    gpu_check.GRACE_S = 0.5
    args = gpu_check.parse_args(["--device", "cpu", "--out", sys.argv[1], "--deadline-s", "1"])
    run = gpu_check.Run(args, sys.argv[1] + "/cpu_interpreter", gpu_check.Deadline(1.0), {},
                        "cpu")
    # a step's process that ignores the deadline, in a session of its own, with a grandchild
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                              "'-c', 'import time; time.sleep(600)']); time.sleep(600)"],
                             start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    run.children.add(child)
    print(child.pid, flush=True)
    gpu_check._watchdog(run)
    time.sleep(60)
    print("the watchdog did not fire", flush=True)
""")


def test_the_watchdog_ends_every_child_process_group(tmp_path):
    script = tmp_path / "watchdog.py"
    script.write_text(WATCHDOG_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, env=env_without_interpreter(TRITON_INTERPRET="1"), cwd=ROOT,
                         timeout=120, check=False)
    assert run.returncode == 3, run.stdout + run.stderr[-2000:]
    pgid = int(run.stdout.split()[0])
    time.sleep(0.5)
    # alive: in the group and not a zombie (killed, waiting for init to reap it)
    listing = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True,
                             text=True).stdout.split("\n")
    alive = [line for line in listing if line.split() and not line.split()[1].startswith("Z")]
    assert alive == [], f"still running in group {pgid}: {alive}"
    assert "stopped by its watchdog" in (tmp_path / "cpu_interpreter" / "summary.md").read_text()


def test_the_deadline_counts_from_started_at(tmp_path, monkeypatch):
    """make gpu-check passes the time it started (before the install): a run that starts with
    its deadline already spent runs no step."""
    monkeypatch.setenv("DYNCONV_TUNED_DIR", str(tmp_path / "restored-after"))
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--deadline-s", "400",
                           "--started-at", str(time.time() - 399)])
    assert code == 1
    summary = (tmp_path / "cpu_interpreter" / "summary.md").read_text()
    assert "| correctness | cut by the deadline" in summary
    assert "Deadline 400 s; ran 399 s." in summary or "Deadline 400 s; ran 400 s." in summary
