"""``python -m dynconv.autotune gpu-check``: a first GPU run that answers the big questions in
under 7 minutes (``make gpu-check OUT=dir``; run by path, ``python autotune/gpu_check.py``, it
needs no install).

One global deadline (``--deadline-s``, 420 s, counted from ``--started-at``: make's start, so
that the install counts) that every step checks; past it (and a grace), a watchdog writes the
summary, ends every child process group and exits. Results are written as they come (CSV rows
appended and flushed: a killed run keeps what it measured). The correctness and timing cases
run one at a time in a child process (:mod:`.gpu_child`): a case that kills it, hangs or breaks
its CUDA context loses only itself, and the next case runs in a fresh child. In order:

1. **plan**: the correctness cases and the timed cases; one config per kernel and launch is
   pinned (:func:`.gpu_steps.pinned_configs`, found by driving every launch on meta tensors with
   every way into a kernel refused, and written as a tuned table that every launch, in every
   thread and process, looks up), so nothing is autotuned;
2. **precompile**: what those cases launch is captured (:mod:`.launch_capture`: the launchers on
   meta tensors, specialised by Triton's binder) and compiled for this GPU in a pool of worker
   processes (up to 16), with each kernel's C launcher where Triton builds one per signature;
   each case below waits only for its own kernels, so the correctness pass starts early;
   ``precompile.csv`` has every kernel's registers, spills, shared memory, wgmma / mma and
   asynchronous loads;
3. **correctness**: about 60 cases, y and the four gradients of ``backend="triton"`` (premix,
   fused, spanning or premix_tma forced) against ``native`` in float64 on the GPU, each element
   within the tests' rounding bound (``correctness.csv``); and two ODConv cases: triton with
   in_scale, out_scale and tap_scale against ODConv's published formulation in float64, the
   scales' gradients too;
4. **timings**: the ResNet-18 layers at batch 32, bf16, channels_last, then NCHW, fp32 and
   batch 128: static cuDNN conv, the grouped trick, triton (auto, premix, fused, spanning, and
   premix_tma where TMA can address the layer) and
   the batch-spanning form in PyTorch, forward / backward / forward+backward interleaved with
   the static conv, peak memory (``timings.csv``, bench's columns), and per-kernel device times
   from the profiler (``kernels.csv``), each strategy as benchmark mode times it
   (``strategies.csv``, and the fastest into the table ``<device>.json``); last, ODConv on two
   layers: the library's (``odconv_auto``) against the published formulation and the static
   conv, time and peak memory (no profiles); no compile pool runs meanwhile;
5. with the time left only: the **sweep** of ResNet-18's layers, the timed ones first (its
   candidates precompiled in the pool first; into ``<device>.json``), then a trimmed **tests**
   run (pytest, Triton tests).

Everything goes to ``OUT/<device>/`` (at most 8 files, 1 folder down, what the GPU tool brings
back): ``gpu_check.log``,
``summary.md`` (what ran, the verdicts, estimated against actual seconds) and the CSVs.
``--dry-run`` prints the plan with each step's compile count (captured for ``--arch``, 90 by
default without a GPU) and the estimated time at ``--compile-s`` per compile over 16 compilers.
``--device cpu --tiny`` runs the same code on miniatures under Triton's interpreter (tests).
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

STEPS = ("precompile", "correctness", "timings", "sweep", "tests")
TIME_LEFT_STEPS = ("sweep", "tests")
# Test files that run Triton kernels (the trimmed pytest step), and the tests kept.
TEST_PATTERNS = ("test_triton_backward.py", "test_triton_forward.py", "test_triton_ops.py")
# what the correctness step does not cover: the custom ops' registration and fakes, requested
# gradients only, determinism, strided views, the tf32 switch, a training run
TEST_SELECTION = ("opcheck or fake or only_requested or deterministic or strided or tf32_setting "
                  "or training_matches")

# The estimate (--dry-run; summary.md compares it with what happened). Guesses until the first
# run's summary replaces them.
# python, torch and Triton imports, CUDA init and the pinned table, then each step's case
# process (measured on the H200: 157 s in all, the child ready in 4.7 s)
STARTUP_S = 30.0
POOL_START_S = 15.0  # spawning the compile workers (each imports torch and Triton)
CHECK_CASE_S = 0.8  # one small correctness case: triton fwd+bwd, float64 reference and scale
CHECK_LAYER_CASE_S = 3.0  # one at a ResNet layer's size, batch 32
PROFILE_S = 1.0  # one profiled forward+backward (5 steps) of one provider
STRATEGIES_S = 2.0  # each strategy of one case timed as benchmark mode times it
MEMORY_S = 0.05  # one peak-memory probe
SAMPLE_OVERHEAD_MS = 10.0  # per do_bench sample beyond rep_ms and its warm-up (rep_ms / 4)
SWEEP_MIN_S = 60.0  # the sweep starts only with this much time left
SWEEP_SHARE = 0.6  # of the time left, unless the tests would then get less than TESTS_MIN_S
TESTS_MIN_S = 30.0
ESTIMATE_COMPILERS = 16  # the GPU machine's cores (the run uses min(16, its CPU count))
RESERVE_S = 8.0  # kept for the summary
GRACE_S = 25.0  # past the deadline, the watchdog writes the summary and exits


# --- running from the source tree without an install -------------------------------------------

SHIM_SOURCE = '''\
"""Written by dynconv's gpu-check: dynconv, dynconv.kernels and dynconv.autotune are imported
from the source tree {tree!r} (pyproject.toml's package-dir mapping) without an install: a
finder placed first on sys.meta_path, in every process started with this folder on PYTHONPATH.
"""
import importlib.machinery
import importlib.util
import os
import sys

_TREE = {tree!r}
_PACKAGES = {{"dynconv": "dynconv", "dynconv.kernels": "kernels", "dynconv.autotune": "autotune"}}


class DynconvTreeFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = _PACKAGES.get(name)
        if folder is None:
            return None
        folder = os.path.join(_TREE, folder)
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


if not any(getattr(f, "__name__", "") == "DynconvTreeFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, DynconvTreeFinder)
os.environ.setdefault("DYNCONV_PATH_SHIM", _TREE)

# Run the sitecustomize this one hides, if there is one.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''


def source_tree() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_path_shim(folder: str, tree: str | None = None) -> str:
    """Write the path shim (a ``sitecustomize.py``) into ``folder``; put ``folder`` first on
    PYTHONPATH and every Python started so imports dynconv from ``tree``. Returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "sitecustomize.py")
    with open(path, "w") as f:
        f.write(SHIM_SOURCE.format(tree=tree or source_tree()))
    return path


def run_from_tree(argv: list[str]) -> None:
    """``python autotune/gpu_check.py ARGS``: write the path shim to a temporary folder and
    replace this process by ``python -m dynconv.autotune gpu-check ARGS`` under it."""
    folder = tempfile.mkdtemp(prefix="dynconv-path-shim-")
    write_path_shim(folder)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
    print(f"gpu-check: importing dynconv from {source_tree()} through the path shim in {folder}",
          flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "dynconv.autotune", "gpu-check", *argv],
              env)


def install_mode() -> str:
    """How dynconv was imported here (for the summary)."""
    import dynconv
    import dynconv.kernels

    shim = os.environ.get("DYNCONV_PATH_SHIM")
    where = os.path.dirname(os.path.dirname(os.path.abspath(dynconv.kernels.__file__)))
    if shim:
        return f"path shim (source tree {shim})"
    editable = any("editable" in f"{getattr(f, '__module__', '')} {f!r}".lower()
                   for f in sys.meta_path)
    kind = "editable install" if editable else "installed or on sys.path"
    return f"{kind} ({os.path.dirname(os.path.abspath(dynconv.__file__))}, kernels in {where})"


# --- plumbing ------------------------------------------------------------------------------------


class Deadline:
    """The run's one deadline: seconds left, and whether a step of ``seconds`` still fits."""

    def __init__(self, seconds: float, clock=time.monotonic, already: float = 0.0):
        """``already``: seconds that count as spent before now (the install)."""
        self.clock = clock
        self.start = clock() - already
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class Log:
    """Writes to stdout and to the log file at once."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w", buffering=1)  # closed by close()
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            if not self.file.closed:
                self.file.write(text + "\n")

    def close(self) -> None:
        with self.lock:
            self.file.close()


class CsvSink:
    """A CSV written row by row: each row appended and flushed at once (a killed run keeps
    its rows); columns fixed up front, unknown keys ignored."""

    def __init__(self, path: str, columns: list[str]):
        self.path = path
        self.columns = list(columns)
        self.file = open(path, "w", newline="")  # closed by close()
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()
        self.lock = threading.Lock()
        self.rows = 0

    def write(self, rows) -> None:
        rows = [rows] if isinstance(rows, dict) else rows
        with self.lock:
            if self.file.closed:
                return
            for row in rows:
                self.writer.writerow(row)
                self.rows += 1
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            self.file.close()


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict | None = None
    skip_reason: str | None = None
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    estimate_s: float | None = None
    started: float = 0.0


def run_step(step: Step, log: Log, children: set | None = None) -> None:
    """Run one step's process, streaming its output to the log, killing it at its timeout;
    ``children``: the run's set of live processes, which the watchdog ends."""
    log(f"\n=== {step.name}: {' '.join(shlex.quote(a) for a in step.argv)}"
        f"  (limit {step.timeout_s:.0f} s)")
    if step.skip_reason:
        step.status = f"skipped: {step.skip_reason}"
        log(step.status)
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(step.env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    start = time.monotonic()
    try:
        process = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, start_new_session=True)
    except OSError as exc:
        step.status = f"failed to start: {exc}"
        log(step.status)
        return
    assert process.stdout is not None
    if children is not None:
        children.add(process)

    def pump():  # a thread, so that a silent process can still be timed out
        for line in process.stdout:
            log(line.rstrip("\n").split("\r")[-1])  # progress bars: keep their last state

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(1.0, step.timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(10)
    if children is not None:
        children.discard(process)
    step.seconds = time.monotonic() - start
    if timed_out:
        step.status = f"timed out after {step.timeout_s:.0f} s"
    elif process.returncode == 0:
        step.status = "ok"
    else:
        step.status = f"failed (exit code {process.returncode})"
    log(f"--- {step.name}: {step.status} in {step.seconds:.0f} s")


def environment() -> tuple[dict, str | None]:
    """(facts about torch / Triton / the GPU, why the GPU steps cannot run or None)."""
    facts = {"python": sys.version.split()[0]}
    try:
        import torch
    except ImportError as exc:
        return facts, f"torch is not importable: {exc}"
    facts["torch"] = torch.__version__
    facts["torch cuda"] = str(torch.version.cuda)
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as exc:
        facts["triton"] = f"not importable ({exc})"
    if not torch.cuda.is_available():
        return facts, "torch.cuda.is_available() is False: no usable CUDA GPU"
    facts["gpu"] = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    facts["capability"] = f"sm_{major}{minor}"
    facts["gpu memory GiB"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
    if facts["triton"].startswith("not importable"):
        return facts, "Triton is not importable"
    return facts, None


def gpu_test_files(tests_dir: str) -> list[str]:
    return [path for name in TEST_PATTERNS
            for path in sorted(glob.glob(os.path.join(tests_dir, name)))]


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The cases of each step, what each launches, and (once captured) what each compiles."""

    checks: list
    timings: list
    launches: list = field(default_factory=list)  # gpu_steps.Launches, checks then timings
    jobs: list | None = None  # per launch, its CompileJobs (None: not captured)
    capture_s: float = 0.0
    arch: int | None = None

    @classmethod
    def build(cls, tiny: bool) -> Plan:
        from . import gpu_steps

        plan = cls(gpu_steps.check_cases(tiny), gpu_steps.timing_cases(tiny))
        plan.launches = ([gpu_steps.launches_of_check(c) for c in plan.checks]
                         + [gpu_steps.launches_of_timing(c) for c in plan.timings])
        return plan

    def capture(self, arch: int) -> None:
        from . import gpu_steps

        start = time.perf_counter()
        self.jobs = gpu_steps.compile_jobs(self.launches, arch)
        self.capture_s = time.perf_counter() - start
        self.arch = arch

    def new_jobs(self) -> tuple[list, list]:
        """(new compile jobs of the correctness step, of the timings step): each job counted
        in the first step whose cases launch it."""
        seen: set = set()
        steps: tuple[list, list] = ([], [])
        for index, jobs in enumerate(self.jobs or []):
            step = steps[0] if index < len(self.checks) else steps[1]
            for job in jobs:
                if job.key not in seen:
                    seen.add(job.key)
                    step.append(job)
        return steps


def estimate(plan: Plan, args) -> dict:
    """Estimated seconds of each mandatory step (compiles at ``args.compile_s`` each over
    ESTIMATE_COMPILERS compilers, plus the pool's start) and of the startup."""
    from . import bench, gpu_steps

    check_jobs, timing_jobs = plan.new_jobs()
    compilers = ESTIMATE_COMPILERS
    compiles = len(check_jobs) + len(timing_jobs)
    compile_s = (POOL_START_S + compiles * args.compile_s / compilers) if compiles else 0.0
    layer_checks = sum(c.batch >= 16 for c in plan.checks)
    check_s = (len(plan.checks) - layer_checks) * CHECK_CASE_S + layer_checks * CHECK_LAYER_CASE_S
    samples = 2 + 2 * args.rounds
    per_provider_mode = (samples * (1.25 * args.rep_ms + SAMPLE_OVERHEAD_MS) / 1e3 + MEMORY_S)

    def per_case(case) -> float:  # an ODConv case: its providers, no profiles or strategies
        odconv = case.group == bench.ODCONV_GROUP
        return (len(gpu_steps.case_providers(case)) * 3 * per_provider_mode
                + (0.0 if odconv else len(gpu_steps.PROFILED_PROVIDERS) * PROFILE_S
                   + STRATEGIES_S))

    timing_s = sum(per_case(c) for c in plan.timings)
    return {"startup": STARTUP_S + plan.capture_s, "precompile": compile_s,
            "correctness": check_s, "timings": timing_s, "compiles": compiles,
            "compile_s": compile_s, "run_s": STARTUP_S + plan.capture_s + check_s + timing_s}


def _count_kernels(jobs) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        name = job.kernel.removesuffix("_kernel")
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def print_plan(plan: Plan, args, facts: dict) -> dict:
    """The dry run's report; returns the estimate."""
    from . import gpu_steps

    print("gpu-check plan (dry run); environment: "
          + ", ".join(f"{k} {v}" for k, v in facts.items()))
    print(f"deadline {args.deadline_s:.0f} s; compile estimate {args.compile_s:g} s per compile, "
          f"{ESTIMATE_COMPILERS} parallel compilers"
          + (f"; launches captured for sm_{plan.arch} in {plan.capture_s:.1f} s"
             if plan.jobs is not None else ""))
    pins: dict[str, set] = {}
    for launch in plan.launches:
        for name, config in gpu_steps.pinned_configs(launch.shape, launch.experts,
                                                     launch.dtype).items():
            pins.setdefault(name, set()).add(gpu_steps.config_text(config))
    print("pinned configs: " + "; ".join(f"{k}: {' | '.join(sorted(v))}"
                                          for k, v in pins.items()))
    counted = plan.jobs is not None
    check_jobs, timing_jobs = plan.new_jobs() if counted else ([], [])
    est = estimate(plan, args) if counted else None
    unknown = "unknown (TRITON_INTERPRET=1: capture needs Triton's compiler)"
    print(f"\n[1] precompile: {len(check_jobs) + len(timing_jobs) if counted else unknown} "
          f"compile jobs" + (f" ({_count_kernels(check_jobs + timing_jobs)}); est. "
                             f"{est['precompile']:.0f} s incl. {POOL_START_S:.0f} s pool start"
                             if counted else ""))
    print(f"[2] correctness: {len(plan.checks)} cases, "
          f"{len(check_jobs) if counted else unknown} new compiles"
          + (f"; est. {est['correctness']:.0f} s" if counted else ""))
    for case in plan.checks:
        print(f"      {case.label}")
    print(f"[3] timings: {len(plan.timings)} cases x providers "
          f"{','.join(gpu_steps.TIMING_PROVIDERS)} x fwd/bwd/fwd+bwd, profiles of "
          f"{','.join(gpu_steps.PROFILED_PROVIDERS)} (the odconv cases: providers "
          f"{','.join(gpu_steps.ODCONV_TIMING_PROVIDERS)}, no profiles); "
          f"{len(timing_jobs) if counted else unknown} new compiles"
          + (f"; est. {est['timings']:.0f} s" if counted else ""))
    for case in plan.timings:
        print(f"      {case.group:12s} {case.shape.name:20s} {case.shape.label():24s} "
              f"B{case.batch} K{case.experts} {case.dtype} {case.layout}")
    layers = ", ".join(s.label() for s in gpu_steps.sweep_shapes())
    print(f"[4] sweep (time left only, >= {SWEEP_MIN_S:.0f} s): late layers first: {layers}; "
          "bf16 channels_last B32; candidates precompiled in the pool first")
    print(f"[5] tests (time left only, >= {TESTS_MIN_S:.0f} s): pytest {' '.join(TEST_PATTERNS)}"
          f" -k '{TEST_SELECTION}'")
    if not counted:
        print("budget: unknown (no capture)")
        return {}
    total = est["compile_s"] + est["run_s"]
    fits = total <= args.deadline_s
    print(f"\nestimate: startup {est['startup']:.0f} s + precompile {est['precompile']:.0f} s + "
          f"correctness {est['correctness']:.0f} s + timings {est['timings']:.0f} s = "
          f"{total:.0f} s of {args.deadline_s:.0f} s ({'fits' if fits else 'DOES NOT FIT'}; "
          f"{max(0.0, args.deadline_s - total):.0f} s left for the sweep and tests)")
    print(f"budget: compiles={est['compiles']} compile_s={est['compile_s']:.1f} "
          f"run_s={est['run_s']:.1f} total_s={total:.1f} deadline_s={args.deadline_s:.0f} "
          f"fits={'yes' if fits else 'no'}")
    return est


# --- precompiling in worker processes -----------------------------------------------------------


def _job_row(job, status: str) -> dict:
    return {"kernel": job.kernel.removesuffix("_kernel"), "dtype": job.dtype,
            "config": job.config, "specialisation": job.specialisation, "sm": job.arch,
            "status": status, "launches": len(job.labels), "example_launch": job.labels[0]}


# A job with one of these statuses is not launched (its cases are skipped); any other failure
# (the pool could not run it) leaves the kernel to be compiled at its launch, as usual.
FATAL_COMPILE = ("compile error", "the compiler crashed")


class Precompiler:
    """Compiles jobs in a pool of worker processes (spawned: they never touch CUDA), feeding
    it ``workers`` jobs at a time from a queue in submission order. A worker that dies (a
    compiler crash, not an exception) breaks the pool: it is rebuilt, and the jobs that were in
    flight are compiled again one at a time in a pool of one, so that the one that crashed is
    known (and its cases are skipped rather than crashing this process at launch)."""

    def __init__(self, workers: int, on_row, log):
        from collections import deque

        self.workers, self.on_row, self.log = workers, on_row, log
        self.queue: deque = deque()
        self.rows: dict = {}
        self.events: dict = {}
        self.purposes: dict = {}
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._dispatch, daemon=True)
        self.thread.start()

    def _pool(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=workers,
                                   mp_context=multiprocessing.get_context("spawn"))

    def submit(self, jobs, purpose: str = "") -> None:
        with self.cond:
            if self.closed:
                return
            for job in jobs:
                if job.key not in self.events:
                    self.events[job.key] = threading.Event()
                    self.purposes[job.key] = purpose
                    self.queue.append(job)
            self.cond.notify()

    def _finish(self, job, row: dict) -> None:
        if self.events[job.key].is_set():
            return
        row = {**row, "for": self.purposes.get(job.key, "")}
        self.rows[job.key] = row
        try:
            self.on_row(row)
        finally:
            self.events[job.key].set()

    def _dispatch(self) -> None:
        self.in_flight: dict = {}
        self.suspects: list = []
        try:
            self._feed()
        except Exception as exc:  # the pool itself failed: launches will compile in-process
            reason = f"not precompiled: {type(exc).__name__}: {exc}"[:200]
            self.log(f"precompile: {reason}")
            with self.cond:
                self.closed = True
                pending = list(self.queue) + list(self.in_flight.values()) + self.suspects
                self.queue.clear()
            for job in pending:
                self._finish(job, _job_row(job, reason))

    def _feed(self) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        from .gpu_steps import compile_worker, warm_driver_utils

        pool, solo = self._pool(self.workers), None
        pool.submit(warm_driver_utils)  # Triton's driver.c, built once, into the cache
        in_flight, suspects = self.in_flight, self.suspects
        while True:
            with self.cond:
                while not self.closed and not self.queue and not in_flight and not suspects:
                    self.cond.wait()
                if self.closed:
                    break
                while self.queue and len(in_flight) < self.workers:
                    job = self.queue.popleft()
                    in_flight[pool.submit(compile_worker, job)] = job
            if in_flight:
                done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        self._finish(job, future.result())
                    except BrokenProcessPool:
                        suspects.append(job)
                        broken = True
                    except Exception as exc:
                        self._finish(job, _job_row(job, f"worker failed: {exc}"[:200]))
                if broken:
                    suspects.extend(in_flight.values())
                    in_flight.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._pool(self.workers)
                    self.log(f"precompile: a compiler process died; {len(suspects)} jobs that "
                             "were in flight are compiled again one at a time")
                continue
            for job in suspects:  # one at a time: a job that kills its worker is the culprit
                solo = solo or self._pool(1)
                try:
                    row = solo.submit(compile_worker, job).result()
                except BrokenProcessPool:
                    row = _job_row(job, "the compiler crashed (its process died)")
                    solo.shutdown(wait=False)
                    solo = None
                except Exception as exc:
                    row = _job_row(job, f"worker failed: {exc}"[:200])
                self._finish(job, row)
            suspects.clear()
        for executor in (pool, solo):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    def wait(self, jobs, deadline: Deadline) -> bool:
        """Whether every job of ``jobs`` is finished (waiting at most until the deadline); jobs
        never submitted, or submitted after the pool failed, count as finished."""
        for job in jobs:
            event = self.events.get(job.key)
            if self.closed and event is not None and not event.is_set():
                continue
            if event is not None and not event.wait(max(0.0, deadline.left() - RESERVE_S)):
                return False
        return True

    def failures(self, jobs) -> list[str]:
        """Why jobs of ``jobs`` cannot be launched (a compile error or crash), if any."""
        out = []
        for job in jobs:
            status = self.rows.get(job.key, {}).get("status", "")
            if status.startswith(FATAL_COMPILE):
                out.append(f"{job.kernel} {job.config}: {status}")
        return out

    def cancel_queued(self) -> int:
        """Drop the jobs not started yet (their launches compile themselves); how many."""
        with self.cond:
            dropped = list(self.queue)
            self.queue.clear()
        for job in dropped:
            self.events[job.key].set()
        return len(dropped)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.queue.clear()
            self.cond.notify()
        self.thread.join(5)


# --- the run -------------------------------------------------------------------------------------


class Run:
    """One gpu-check run: its deadline, log, CSV sinks, the steps' outcomes and the rows the
    summary reads."""

    def __init__(self, args, folder: str, deadline: Deadline, facts: dict, device: str | None):
        self.args, self.folder, self.deadline, self.facts = args, folder, deadline, facts
        self.device = device
        self.log = Log(os.path.join(folder, "gpu_check.log"))
        self.steps = {name: Step(name, [], 0.0) for name in STEPS}
        self.rows: dict[str, list] = {"correctness": [], "timings": [], "kernels": [],
                                      "precompile": [], "strategies": []}
        self.sinks: dict[str, CsvSink] = {}
        self.compiles = {"hits": 0, "misses": []}  # Triton compiles in the case processes
        self.current: str | None = None
        self.estimate: dict = {}
        self.plan: Plan | None = None
        self.summary_lock = threading.Lock()
        self.finished = False
        self.children: set = set()  # live child processes (each its own process group)

    def sink(self, name: str, columns: list[str]) -> CsvSink:
        if name not in self.sinks:
            self.sinks[name] = CsvSink(os.path.join(self.folder, f"{name}.csv"), columns)
        return self.sinks[name]

    def record(self, name: str, columns: list[str], rows) -> None:
        rows = [rows] if isinstance(rows, dict) else list(rows)
        self.rows[name] += rows
        self.sink(name, columns).write(rows)

    def begin(self, name: str) -> Step:
        self.current = name
        step = self.steps[name]
        step.status, step.seconds = "running", 0.0
        step.estimate_s = self.estimate.get(name)
        step.started = time.monotonic()
        self.log(f"\n=== {name} ({self.deadline.left():.0f} s left)")
        return step

    def end(self, step: Step, status: str, detail: str = "") -> None:
        step.seconds = time.monotonic() - step.started
        step.status, step.detail = status, detail or step.detail
        self.current = None
        self.log(f"--- {step.name}: {status}{': ' + detail if detail else ''} "
                 f"({step.seconds:.0f} s; {self.deadline.left():.0f} s left)")

    def skip(self, name: str, reason: str) -> None:
        self.steps[name].status = f"skipped: {reason}"
        self.log(f"\n=== {name}: skipped: {reason}")


def step_precompile(run: Run, plan: Plan) -> Precompiler | None:
    step = run.begin("precompile")
    import torch

    major, minor = torch.cuda.get_device_capability()
    plan.capture(major * 10 + minor)
    check_jobs, timing_jobs = plan.new_jobs()
    columns = ["for", "kernel", "dtype", "config", "specialisation", "sm", "status", "registers",
               "spill_bytes", "shared_bytes", "tensor_core", "async_loads", "plain_loads",
               "loop_instructions", "loop_tensor_core_ops", "loop_async_loads",
               "loop_plain_loads", "loop_waits_for_mma", "seconds", "wall_s", "launcher", "note",
               "launches", "example_launch"]
    run.sink("precompile", columns)
    workers = max(1, min(16, run.args.jobs))
    precompiler = Precompiler(workers, lambda row: run.record("precompile", columns, row),
                              run.log)
    precompiler.submit(check_jobs, "correctness")  # in the order the steps need them
    precompiler.submit(timing_jobs, "timings")
    # the step runs on in the background; it ends when the timings step has waited for it
    step.detail = (f"{len(check_jobs) + len(timing_jobs)} jobs for sm_{plan.arch} "
                   f"({_count_kernels(check_jobs + timing_jobs)}), {workers} workers; "
                   f"captured in {plan.capture_s:.1f} s")
    run.log(f"precompile: {step.detail}")
    run.current = None
    return precompiler


def _finish_precompile(run: Run, precompiler: Precompiler | None, plan: Plan) -> None:
    step = run.steps["precompile"]
    if precompiler is None or step.status != "running":
        return
    everything = [job for jobs in plan.jobs or [] for job in jobs]
    done = precompiler.wait(everything, run.deadline)
    rows = [r for r in run.rows["precompile"] if r.get("for") != "sweep"]
    fatal = [r for r in rows if str(r.get("status")).startswith(FATAL_COMPILE)]
    other = [r for r in rows if r.get("status") != "ok" and r not in fatal]
    detail = (f"{step.detail}; {len(rows)} done: {len(fatal)} failed to compile, {len(other)} "
              "with other problems (spills, shared memory, not precompiled)")
    step.seconds = time.monotonic() - step.started
    step.status = "cut by the deadline" if not done else "FAIL" if fatal else "ok"
    step.detail = detail
    run.log(f"--- precompile: {step.status}: {detail} ({step.seconds:.0f} s)")


def _wait_for(run: Run, precompiler, jobs) -> str | None:
    """None when the case may run, else why not (deadline, or its kernels failed to compile)."""
    if precompiler is None or jobs is None:
        return None
    if not precompiler.wait(jobs, run.deadline):
        return "deadline"
    failed = precompiler.failures(jobs)
    return f"kernel failed to compile: {failed[0]}" if failed else None


# A case's own time limit in its child process (a hang, not a slow case: the layer cases take
# seconds, a cold compile tens of seconds); the deadline bounds it too.
CASE_LIMIT_S = {"correctness": 150.0, "timings": 240.0}
CHILD_START_S = 120.0  # importing torch and Triton and initialising CUDA in a fresh child
CHILD_STARTS = 8  # children a step may start (each case that breaks CUDA costs one)


def _run_cases(run: Run, plan: Plan, precompiler, name: str) -> None:
    """Run the cases of step ``name`` (correctness or timings) one at a time in a child process
    (:mod:`.gpu_child`): a case that kills its process, breaks its CUDA context or hangs is
    recorded as an error row and the next case runs in a fresh child."""
    from . import bench, gpu_steps
    from .gpu_child import CaseProcess

    step = run.begin(name)
    cases = plan.checks if name == "correctness" else plan.timings
    offset = 0 if name == "correctness" else len(plan.checks)
    columns = {"correctness": gpu_steps.CHECK_COLUMNS, "timings": bench.COLUMNS,
               "kernels": gpu_steps.KERNEL_COLUMNS, "strategies": gpu_steps.STRATEGY_COLUMNS}

    def on_compile(hit: bool, kernel: str) -> None:
        if hit:
            run.compiles["hits"] += 1
        else:
            run.compiles["misses"].append(f"{name}: {kernel}")

    tail = ["--device", run.device, "--rep-ms", str(run.args.rep_ms),
            "--rounds", str(run.args.rounds), "--device-slug", os.path.basename(run.folder)]
    child = CaseProcess(name, tail + (["--tiny"] if run.args.tiny else []), run.log,
                        lambda sink, rows: run.record(sink, columns[sink], rows), on_compile,
                        run.children)
    counts = {"ok": 0, "FAIL": 0, "error": 0, "skipped": 0}
    deaths: list[str] = []
    try:
        for index, case in enumerate(cases):
            label = getattr(case, "label", None) or f"{case.group} {case.shape.label()}"
            if not run.deadline.allows(RESERVE_S + 2):
                run.end(step, "cut by the deadline", f"{index} of {len(cases)} cases run")
                return
            why = _wait_for(run, precompiler,
                            plan.jobs[offset + index] if plan.jobs else None)
            if why == "deadline":
                run.end(step, "cut by the deadline", f"{index} of {len(cases)} cases run")
                return
            if why and name == "correctness":
                run.record(name, columns[name], [{"case": label, "tensor": "all",
                                                  "status": "skipped", "note": why}])
                counts["skipped"] += 1
                run.log(f"  skipped {label}: {why}")
                continue
            if child.process is None and child.starts >= CHILD_STARTS:
                run.end(step, "error", f"{child.starts} case processes started, the last "
                        f"died: {deaths[-1] if deaths else '?'}; {index} of {len(cases)} run")
                return
            limit = min(CASE_LIMIT_S[name], run.deadline.left() - RESERVE_S)
            start_limit = min(CHILD_START_S, run.deadline.left() - RESERVE_S)
            result = child.run(index, why, limit, start_limit)
            if isinstance(result, dict):
                counts[result["status"] if result["status"] in counts else "error"] += 1
                run.log(result["line"])
                continue
            counts["error"] += 1
            deaths.append(f"{label}: {result}")
            run.log(f"  error   {label}: {result}")
            note = f"the case's process: {result}"[:300]
            if name == "correctness":
                run.record(name, columns[name], [{"case": label, "tensor": "all",
                                                  "status": "error", "note": note}])
            else:
                run.record(name, columns[name], [{**bench.case_columns(case), "provider": "all",
                                                  "status": "error", "note": note}])
    finally:
        child.close()
    detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if deaths:
        detail += f"; {len(deaths)} lost their process (first: {deaths[0]})"
    verdict = ("ok" if counts["ok"] == len(cases)
               else "FAIL" if name == "correctness" else "errors")
    run.end(step, verdict, detail)


def step_correctness(run: Run, plan: Plan, precompiler) -> None:
    _run_cases(run, plan, precompiler, "correctness")


def step_timings(run: Run, plan: Plan, precompiler) -> None:
    _run_cases(run, plan, precompiler, "timings")


def write_strategy_table(run: Run) -> None:
    """The timings' strategy choices into the run's tuned table (``<folder>/<device>.json``,
    which the sweep then extends): the ``strategies`` section ``auto`` reads first."""
    from dynconv.kernels import tuned_table

    from . import gpu_steps
    from .sweep import open_table, write_table

    entries = gpu_steps.strategy_table_entries(run.rows["strategies"])
    if not entries or run.device != "cuda":
        return
    import torch

    slug, name = tuned_table.device_id(torch.device("cuda"))
    path = tuned_table.table_path(slug, run.folder)
    table = open_table(path, name, slug)
    for kind, by_key in entries.items():
        table.setdefault("strategies", {}).setdefault(kind, {}).update(by_key)
    write_table(table, path)
    run.log(f"strategies: {sum(map(len, entries.values()))} measured choices written to {path}")


def sweep_argv(folder: str, budget_s: float) -> list[str]:
    from . import gpu_steps

    argv = [sys.executable, "-m", "dynconv.autotune", "sweep"]
    for s in gpu_steps.sweep_shapes():
        argv += ["--shape", f"name={s.name},cin={s.cin},cout={s.cout},h={s.h},w={s.w},"
                            f"kh={s.kh},kw={s.kw},stride={s.stride},padding={s.padding},"
                            f"dilation={s.dilation},groups={s.groups}"]
    return argv + ["--batch", "32", "--experts", "4", "--dtype", "bf16", "--layout",
                   "channels_last", "--table-dir", folder, "--time-budget",
                   str(int(max(1, budget_s))), "--no-progress"]


def step_sweep(run: Run, precompiler) -> None:
    """The sweep of the late layers, in SWEEP_SHARE of the time left (the tests get the rest);
    their candidates are compiled in the pool first (for at most a third of that), so that the
    sweep mostly finds them in the cache."""
    from . import gpu_steps

    left = run.deadline.left() - RESERVE_S
    if left < SWEEP_MIN_S:
        run.skip("sweep", f"{left:.0f} s left, it needs {SWEEP_MIN_S:.0f}")
        return
    left = left if left * (1 - SWEEP_SHARE) < TESTS_MIN_S else left * SWEEP_SHARE
    step = run.begin("sweep")
    if precompiler is not None and run.plan and run.plan.arch:
        launches = [gpu_steps.Launches(s, 32, 4, "bf16", True, True,
                                       gpu_steps.FORWARD_STRATEGIES)
                    for s in gpu_steps.sweep_shapes()]
        jobs = [j for js in gpu_steps.compile_jobs(launches, run.plan.arch, pin=False)
                for j in js]
        precompiler.submit(jobs, "sweep")
        started = time.monotonic()
        ready = precompiler.wait(jobs, Deadline(left / 3 + RESERVE_S))
        dropped = 0 if ready else precompiler.cancel_queued()  # no compiling while it times
        run.log(f"sweep: {len(jobs) - dropped} of {len(jobs)} candidate kernels precompiled")
        left -= time.monotonic() - started
    sub = Step("sweep", sweep_argv(run.folder, left - 45), left,
               env={"DYNCONV_TUNED_DIR": None})
    run_step(sub, run.log, run.children)
    run.end(step, sub.status, "table " + os.path.join(run.folder, f"{os.path.basename(run.folder)}"
                                                      ".json"))


def step_tests(run: Run) -> None:
    left = run.deadline.left() - RESERVE_S
    files = gpu_test_files(run.args.tests_dir)
    if left < TESTS_MIN_S:
        run.skip("tests", f"{left:.0f} s left, it needs {TESTS_MIN_S:.0f}")
        return
    if not files:
        run.skip("tests", f"no Triton test files in {run.args.tests_dir!r}")
        return
    step = run.begin("tests")
    sub = Step("tests", [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p",
                         "no:cacheprovider", "--maxfail=10", "-k", TEST_SELECTION, *files],
               left, env={"DYNCONV_TUNED_DIR": None})
    run_step(sub, run.log, run.children)
    run.end(step, sub.status)


# --- the summary ---------------------------------------------------------------------------------


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _timing_lines(rows: list[dict], listed: tuple[str, ...] | None = None) -> list[str]:
    from . import gpu_steps

    listed = listed or gpu_steps.TIMING_PROVIDERS
    providers = [p for p in listed[1:] if any(r["provider"] == p for r in rows)]
    cases: dict[tuple, dict] = {}
    for r in rows:
        key = (r["group"], r["shape"], r["batch"], r["dtype"], r["layout"])
        cases.setdefault(key, {})[(r["provider"], r["mode"])] = r
    lines = ["Time of each provider / the static conv's in the same rounds, forward | "
             "forward+backward (bench's columns in timings.csv; `-`: did not run, see its note)."
             " Peak memory of forward+backward in MiB.", "",
             "| case | static ms fwd, f+b | " + " | ".join(providers) + " | peak MiB: static, "
             + ", ".join(providers) + " |", "|---" * (len(providers) + 3) + "|"]
    def ratio(got, p, m):
        r = got.get((p, m))
        value = _float(r["ratio_to_static"]) if r and r["status"] == "ok" else float("nan")
        return "-" if math.isnan(value) else f"{value:.2f}"

    def mib(got, p):
        value = _float(got.get((p, "fwd+bwd"), {}).get("peak_mem_bytes"))
        return "-" if math.isnan(value) else f"{value / 2**20:.0f}"

    for (group, shape, batch, dtype, layout), got in cases.items():

        static = [_float(got.get(("static", m), {}).get("time_ms")) for m in ("fwd", "fwd+bwd")]
        lines.append(f"| {group} {shape} B{batch} {dtype} {layout} | "
                     f"{static[0]:.3f}, {static[1]:.3f} | "
                     + " | ".join(f"{ratio(got, p, 'fwd')} \\| {ratio(got, p, 'fwd+bwd')}"
                                  for p in providers)
                     + f" | {', '.join(mib(got, p) for p in ['static', *providers])} |")
    return lines


def _strategy_lines(rows: list[dict]) -> list[str]:
    """Per case: each forward and backward strategy's ms as benchmark mode times it, fastest
    in bold (strategies.csv; the table's ``strategies`` section)."""
    cases: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("group"), r.get("shape"), r.get("batch"), r.get("dtype"), r.get("layout"))
        cases.setdefault(key, {}).setdefault(r.get("kind"), []).append(r)
    lines = ["Each strategy of `triton` timed as benchmark mode times it (median ms of 5 calls "
             "after a warm-up; backward: all four gradients); **fastest**.", "",
             "| case | forward | backward |", "|---|---|---|"]

    def cell(items):
        parts = []
        for r in items or []:
            if r.get("status") != "ok":
                parts.append(f"{r.get('strategy')} -")
                continue
            text = f"{r['strategy']} {float(r['ms']):.3f}"
            parts.append(f"**{text}**" if r.get("fastest") in (True, "True") else text)
        return ", ".join(parts) or "-"

    for (group, shape, batch, dtype, layout), kinds in cases.items():
        lines.append(f"| {group} {shape} B{batch} {dtype} {layout} | {cell(kinds.get('forward'))}"
                     f" | {cell(kinds.get('backward'))} |")
    return lines


def _kernel_lines(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r.get("shape"), r.get("batch"), r.get("dtype"), r.get("layout"),
                           r.get("provider")), []).append(r)
    lines = ["Per forward+backward step, from torch.profiler (kernels.csv has every kernel):", ""]
    for (shape, batch, dtype, layout, provider), items in groups.items():
        ok = [r for r in items if r.get("status") == "ok"]
        if not ok:
            lines.append(f"- {shape} B{batch} {dtype} {layout} {provider}: "
                         f"{items[0].get('note', 'no data')}")
            continue
        top = ", ".join(f"{r['kernel'][:40]} {float(r['us_per_step']):.0f} us" for r in ok[:5])
        lines.append(f"- {shape} B{batch} {dtype} {layout} **{provider}**: "
                     f"{float(ok[0]['step_us']):.0f} us ({ok[0]['clock']}): {top}")
    return lines


def summary_markdown(run: Run) -> str:
    facts = ", ".join(f"{k} {v}" for k, v in run.facts.items())
    where = run.facts.get("gpu") or {"cpu": "the CPU (Triton's interpreter, miniatures)"}.get(
        run.device, "no GPU")
    lines = [f"# gpu-check on {where}", "", f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {facts}.",
             f"Deadline {run.args.deadline_s:.0f} s; ran {run.deadline.elapsed():.0f} s.", "",
             "## Steps", "", "| step | status | seconds (estimated) | detail |",
             "|---|---|---|---|"]
    for step in run.steps.values():
        est = f" ({step.estimate_s:.0f})" if step.estimate_s is not None else ""
        lines.append(f"| {step.name} | {step.status} | {step.seconds:.0f}{est} | "
                     f"{step.detail} |")
    misses = run.compiles["misses"]
    lines += ["", f"Triton compiles in the case processes: {run.compiles['hits']} from the cache "
                  f"(precompiled), {len(misses)} cold" + (": " + "; ".join(misses[:10])
                                                          if misses else ".")]
    checks = run.rows["correctness"]
    if checks:
        bad = [r for r in checks if r.get("status") != "ok"]
        worst: dict[str, float] = {}
        for r in checks:
            value = _float(r.get("worst_error_over_bound"))
            if not math.isnan(value):
                worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), value)
        lines += ["", "## Correctness (triton vs native in float64)", "",
                  f"{len({r['case'] for r in checks})} cases, {len(bad)} rows not ok. Worst "
                  "error / bound per dtype: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())) + "."]
        unpinned = {r["case"] for r in checks if any(
            not p.endswith(":table") for p in (r.get("config_sources") or "").split())}
        if unpinned:
            lines.append(f"Launches that did not take the pinned table's config in "
                         f"{len(unpinned)} cases (config_sources in correctness.csv).")
        lines += [f"- {r['status']} {r['case']} {r.get('tensor', '')}: "
                  f"{r.get('worst_error_over_bound') or ''} {r.get('note') or ''}"
                  for r in bad[:30]]
    timings, odconv = run.rows["timings"], []
    if timings:  # (bench imports torch: only where there are rows)
        from .bench import ODCONV_GROUP

        odconv = [r for r in timings if r.get("group") == ODCONV_GROUP]
        timings = [r for r in timings if r.get("group") != ODCONV_GROUP]
    if timings:
        lines += ["", "## Timings", ""] + _timing_lines(timings)
    if odconv:
        from .gpu_steps import ODCONV_TIMING_PROVIDERS

        lines += ["", "## ODConv timings", "",
                  "The library's ODConv (`odconv_auto`: dynamic_conv2d with in_scale, "
                  "out_scale and tap_scale, backend auto) and ODConv's published formulation "
                  "(`odconv_published`: the B x K x |W| aggregate materialised), on the same "
                  "inputs; the attentions are inputs (random positive tensors that need "
                  "gradients), the router is not timed (the same in both). Their correctness "
                  "rows are the `odconv` cases of the correctness table (triton with the "
                  "scales against the published formulation in float64).", ""]
        lines += _timing_lines(odconv, ODCONV_TIMING_PROVIDERS)
    if run.rows["strategies"]:
        lines += ["", "## Strategies", ""] + _strategy_lines(run.rows["strategies"])
    if run.rows["kernels"]:
        lines += ["", "## Kernels", ""] + _kernel_lines(run.rows["kernels"])
    compiled = [r for r in run.rows["precompile"] if r.get("for") != "sweep"]
    if compiled:
        problems = [r for r in compiled if r.get("status") != "ok"]
        cores = sorted({f"{r['kernel']}: {r.get('tensor_core') or '-'}" for r in compiled})
        seconds = [_float(r.get("seconds")) for r in compiled]
        seconds = [s for s in seconds if not math.isnan(s)]
        swept = len(run.rows["precompile"]) - len(compiled)
        lines += ["", "## Precompile", "",
                  f"{len(compiled)} kernels compiled for the checks and timings (and {swept} "
                  f"candidates for the sweep), {len(problems)} with problems; compile "
                  f"time mean {sum(seconds) / max(1, len(seconds)):.1f} s, max "
                  f"{max(seconds, default=0):.1f} s; tensor cores: {', '.join(cores)}."]
        lines += [f"- {r['kernel']} {r['dtype']} {r['config']} ({r.get('example_launch')}): "
                  f"{r['status']}" for r in problems[:20]]
    return "\n".join(lines) + "\n"


def write_summary(run: Run, note: str = "") -> None:
    with run.summary_lock:
        if run.finished:
            return
        text = summary_markdown(run) + (f"\n{note}\n" if note else "")
        path = os.path.join(run.folder, "summary.md")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def _watchdog(run: Run) -> threading.Timer:
    """Past the deadline (and a grace for the case in flight): summary, then exit."""
    def fire():
        run.log(f"\ngpu-check: {GRACE_S:.0f} s past the deadline in step {run.current}: "
                "writing the summary and exiting")
        if run.current in run.steps:
            run.steps[run.current].status = "killed at the hard deadline"
        for child in list(run.children):  # each in its own session: end their groups
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        write_summary(run, "The run was stopped by its watchdog.")
        run.finished = True
        for sink in run.sinks.values():
            sink.close()
        os._exit(3)

    timer = threading.Timer(max(1.0, run.deadline.left() + GRACE_S), fire)
    timer.daemon = True
    timer.start()
    return timer


# --- the command ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.autotune gpu-check",
        description="On a GPU machine (no network needed), within one deadline: precompile "
                    "the pinned kernels in parallel, check triton against native (y and the "
                    "four gradients), time the ResNet-18 layers against cuDNN, then with the "
                    "time left a sweep and the Triton tests; written to OUT/<device>/.")
    parser.add_argument("--out", default="perf_reports", help="output root (default %(default)s)")
    parser.add_argument("--deadline-s", type=float, default=420.0, metavar="S",
                        help="the whole run's deadline in seconds (default %(default)s)")
    parser.add_argument("--started-at", type=float, default=None, metavar="EPOCH",
                        help="when the deadline starts counting (seconds since the epoch; "
                             "`make gpu-check` passes its own start, so the install counts); "
                             "default: now")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cpu: the same steps on miniatures under Triton's interpreter "
                             "(for tests; implies --tiny)")
    parser.add_argument("--tiny", action="store_true", help="miniature cases")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, its compile counts and the estimated time")
    parser.add_argument("--arch", type=int, default=None,
                        help="compute capability the dry run captures for (default: this "
                             "GPU's, else 90)")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="parallel compiler processes (at most 16; default %(default)s)")
    parser.add_argument("--compile-s", type=float, default=3.0,
                        help="estimated seconds per compile (default %(default)s)")
    parser.add_argument("--rep-ms", type=float, default=10.0,
                        help="do_bench's rep per timed sample (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds per timing (default %(default)s)")
    parser.add_argument("--skip", default="",
                        help=f"comma-separated steps not to run, from {','.join(STEPS)}")
    parser.add_argument("--tests-dir", default="tests", help="where the test files are")
    args = parser.parse_args(argv)
    for name in ("deadline_s", "jobs", "compile_s", "rep_ms", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(STEPS):
        parser.error(f"--skip: unknown steps {sorted(args.skip - set(STEPS))}; from {STEPS}")
    args.tiny = args.tiny or args.device == "cpu"
    return args


def dry_run(args) -> int:
    facts, gpu_reason = environment()
    plan = Plan.build(args.tiny)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        arch = args.arch
        if arch is None and gpu_reason is None:
            import torch

            major, minor = torch.cuda.get_device_capability()
            arch = major * 10 + minor
        plan.capture(arch or 90)
        entries = pinning_pass(plan, plan.arch)
        print("pinning pass: " + ", ".join(f"{k} {len(v)}" for k, v in entries.items())
              + f" launch keys for sm_{plan.arch}; no kernel launched")
    est = print_plan(plan, args, facts)
    print(f"would write to {os.path.join(args.out, '<device>')}/ (gpu_check.log, summary.md, "
          "precompile.csv, correctness.csv, timings.csv, kernels.csv, strategies.csv, "
          "<device>.json)")
    return 1 if est and est["compile_s"] + est["run_s"] > args.deadline_s else 0


def _prepare_device(args) -> tuple[dict, str | None, str | None]:
    """(facts, device or None, why no device)."""
    if args.device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return {}, None, "--device cpu needs TRITON_INTERPRET=1 before triton is imported"
        os.environ["TRITON_INTERPRET"] = "1"
    facts, gpu_reason = environment()
    if args.device == "cpu":
        return facts, "cpu", None
    return facts, (None if gpu_reason else "cuda"), gpu_reason


def _guarded(run: Run, name: str, function, *args):
    """Run one step; an exception is logged and marks the step (``error: ...``), and the run
    goes on with the next step. Returns the function's result, or None."""
    try:
        return function(*args)
    except Exception as exc:
        import traceback

        run.log(traceback.format_exc())
        step = run.steps[name]
        step.status = f"error: {type(exc).__name__}: {exc}"[:200]
        if step.started:
            step.seconds = time.monotonic() - step.started
        run.current = None
        return None


def pinning_pass(plan: Plan, arch: int | None) -> dict:
    """{kernel: {launch key: pinned config}} of every launch of the plan, found by driving the
    launchers without running a kernel (:func:`.gpu_steps.pinned_entries`: a real launch would
    raise): on meta tensors pruned as for a GPU of compute capability ``arch`` (as the capture
    prunes), or on CPU tensors under the interpreter (``arch`` None), whose keys differ."""
    from dynconv.kernels.configs import pruning_for_capability

    from . import gpu_steps

    if arch is None:
        return gpu_steps.pinned_entries(plan.launches, "cpu")
    with pruning_for_capability(arch):
        return gpu_steps.pinned_entries(plan.launches, "meta")


def _pin(run: Run, plan: Plan) -> None:
    """Write the pinned table of the plan's launches and point the kernels at it. Without it
    every launch autotunes (cold compiles of every candidate): slow, but the steps still run,
    and config_sources says so."""
    from dynconv.kernels import tuned_table

    from . import gpu_steps

    try:
        arch = None
        if run.device == "cuda":
            import torch

            major, minor = torch.cuda.get_device_capability()
            arch = major * 10 + minor
        entries = pinning_pass(plan, arch)
        folder = tempfile.mkdtemp(prefix="dynconv-pinned-")
        path = gpu_steps.write_pinned_table(entries, run.device, folder)
    except Exception as exc:
        import traceback

        run.log(traceback.format_exc())
        run.facts["pinned configs"] = f"FAILED ({type(exc).__name__}: {exc}): autotuning"
        return
    os.environ[tuned_table.ENV_DIR] = folder
    tuned_table.clear_cache()
    run.facts["pinned configs"] = f"{sum(map(len, entries.values()))} launch keys"
    run.log(f"pinned configs: {run.facts['pinned configs']} in {path}")


def run_gpu_check(args) -> int:
    already = 0.0 if args.started_at is None else max(0.0, time.time() - args.started_at)
    deadline = Deadline(args.deadline_s, already=already)
    facts, device, reason = _prepare_device(args)
    slug = "no_gpu"
    if device == "cuda":
        from .measure import device_slug

        slug = device_slug("cuda")
    elif device == "cpu":
        slug = "cpu_interpreter"
    folder = os.path.join(args.out, slug)
    run = Run(args, folder, deadline, facts, device)
    watchdog = _watchdog(run)
    precompiler = None
    try:
        try:
            import torch

            from .measure import git_commit

            facts.update(commit=git_commit(), install=install_mode(),
                         cudnn=f"{torch.backends.cudnn.version()} (benchmark "
                               f"{torch.backends.cudnn.benchmark}, tf32 "
                               f"{torch.backends.cudnn.allow_tf32})")
        except Exception as exc:  # facts only
            facts["install"] = f"unknown ({exc})"
        run.log("dynconv gpu-check " + time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        for key, value in facts.items():
            run.log(f"  {key}: {value}")
        if device is None:
            for name in STEPS:
                run.skip(name, reason)
            return 1
        plan = run.plan = Plan.build(args.tiny)
        _pin(run, plan)
        if device == "cuda" and "precompile" not in args.skip:
            precompiler = _guarded(run, "precompile", step_precompile, run, plan)
            if plan.jobs is not None:
                run.estimate = estimate(plan, args)
                for name in ("precompile", "correctness", "timings"):
                    run.steps[name].estimate_s = run.estimate[name]
        else:
            run.skip("precompile", "--skip" if device == "cuda"
                     else "the interpreter compiles nothing")
        for name, function in (("correctness", step_correctness), ("timings", step_timings)):
            if name in args.skip:
                run.skip(name, "--skip")
            else:
                _guarded(run, name, function, run, plan, precompiler)
            if name == "correctness":
                _guarded(run, "precompile", _finish_precompile, run, precompiler, plan)
        _guarded(run, "timings", write_strategy_table, run)
        for name in TIME_LEFT_STEPS:
            if name in args.skip:
                run.skip(name, "--skip")
            elif device != "cuda":
                run.skip(name, "a CPU run has no time-left steps")
            elif name == "sweep":
                _guarded(run, name, step_sweep, run, precompiler)
            else:
                _guarded(run, name, step_tests, run)
    finally:
        if precompiler is not None:
            precompiler.close()
        watchdog.cancel()
        write_summary(run)
        run.finished = True
        run.log(f"\n=== summary ({deadline.elapsed():.0f} s; {os.path.join(folder, 'summary.md')})")
        for step in run.steps.values():
            run.log(f"  {step.name:11s} {step.status}")
        for sink in run.sinks.values():
            sink.close()
        run.log.close()
    mandatory = [run.steps[n] for n in ("precompile", "correctness", "timings")]
    good = all(s.status == "ok" or s.status.startswith("skipped: --skip")
               or (s.name == "precompile" and "interpreter" in s.status) for s in mandatory)
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return dry_run(args) if args.dry_run else run_gpu_check(args)


if __name__ == "__main__":
    if not __package__:  # run by path: no install needed
        run_from_tree(sys.argv[1:])
    sys.exit(main())
