"""gpu-check's cases in a child process, so that a broken CUDA context loses one case, not a step.

A kernel that reads or writes out of bounds on a GPU leaves the process's CUDA context broken:
every later CUDA call fails. So :mod:`.gpu_check` runs the cases of its correctness and timings
steps in a child process (``python -m dynconv.autotune.gpu_child``) and, when one dies, hangs or
reports a broken context, records why against that case and goes on with the next case in a
fresh child.

The protocol is JSON lines. The parent writes ``{"run": index, "why": reason or null}`` or
``{"end": true}`` to the child's stdin; the child writes, each on a line that starts with
:data:`PREFIX`: ``{"type": "ready"}`` once started, ``{"type": "rows", "sink": name, "rows":
[...]}`` as a case's rows come, ``{"type": "compile", "hit": bool, "name": str}`` for each Triton
compile, and ``{"type": "done", "index": i, "status": s, "line": text, "cuda_ok": bool}`` after
each case. Anything else it prints is log text. After a case that left CUDA broken the child
exits with :data:`EXIT_CUDA_BROKEN`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

PREFIX = "@@gpu-check "
EXIT_CUDA_BROKEN = 75
STEPS = ("correctness", "timings")


# --- the child -----------------------------------------------------------------------------------


def _send(message: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(message, default=str) + "\n")
    sys.stdout.flush()


def _listen_to_compiles() -> None:
    try:
        from triton import knobs
    except ImportError:
        return
    if hasattr(knobs, "compilation") and hasattr(knobs.compilation, "listener"):
        knobs.compilation.listener = lambda *, src=None, cache_hit=False, **_: _send(
            {"type": "compile", "hit": bool(cache_hit), "name": str(getattr(src, "name", src))})


def cuda_healthy(device: str) -> bool:
    """Whether CUDA still works in this process (a kernel fault breaks the context for good)."""
    if device != "cuda":
        return True
    import torch

    try:
        torch.cuda.synchronize()
        return float(torch.ones(1, device="cuda").sum()) == 1.0
    except Exception:  # a sticky error: every CUDA call fails from now on
        return False


def _correctness_case(case, device: str) -> tuple[str, str]:
    from . import gpu_steps

    rows = gpu_steps.run_check(case, device)
    _send({"type": "rows", "sink": "correctness", "rows": rows})
    status = ("error" if any(r["status"] == "error" for r in rows)
              else "FAIL" if any(r["status"] == "FAIL" for r in rows) else "ok")
    worst = max((float(r.get("worst_error_over_bound") or 0) for r in rows), default=0)
    line = (f"  {status:7s} {case.label}  (worst error / bound {worst:.3g})"
            + (f": {rows[0]['note']}" if status == "error" else ""))
    return status, line


def _timing_case(case, device: str, why: str | None, timer, meta: dict, rounds: int
                 ) -> tuple[str, str]:
    from . import bench, gpu_steps

    listed = gpu_steps.case_providers(case)
    providers = gpu_steps.providers_for(
        case, [p for p in listed if not (why and gpu_steps.uses_triton(p, device))], device)
    rows = gpu_steps.run_timing(case, device, timer, rounds, memory=device == "cuda",
                                providers=providers)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    full = [{**meta, "load_avg_1min": load, **bench.case_columns(case), **row,
             **bench.derived_columns(row, case, device)} for row in rows]
    _send({"type": "rows", "sink": "timings", "rows": full})
    sources = gpu_steps.config_sources(reset=True)
    ratios = {(r["provider"], r["mode"]): r["ratio_to_static"] for r in rows}
    line = (f"  {case.group:12s} {case.shape.label():24s} B{case.batch} "
            + " ".join(f"{p}={ratios.get((p, 'fwd+bwd'), float('nan')):.2f}"
                       for p in listed[1:])
            + f" (fwd+bwd / static; configs from {sources or '-'})"
            + (f"; triton skipped: {why}" if why else ""))
    if case.group == bench.ODCONV_GROUP:  # no profiles, no strategy timings
        errors = [r for r in rows if r.get("status") not in ("ok", "skipped")]
        return ("error" if errors else "ok"), line
    for provider in gpu_steps.providers_for(case, gpu_steps.PROFILED_PROVIDERS, device):
        if why and provider.startswith("triton"):
            continue
        _send({"type": "rows", "sink": "kernels",
               "rows": gpu_steps.profile_kernels(case, provider, device)})
    if not why:
        strategies = gpu_steps.strategy_rows(case, device)
        _send({"type": "rows", "sink": "strategies", "rows": strategies})
        fastest = {r["kind"]: r["strategy"] for r in strategies if r.get("fastest") is True}
        line += "; fastest " + ", ".join(f"{k} {v}" for k, v in fastest.items())
    errors = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    return ("error" if errors else "ok"), line


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynconv.autotune.gpu_child")
    parser.add_argument("--step", choices=STEPS, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rep-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device-slug", default="")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from . import gpu_steps

    if args.device == "cuda":
        torch.cuda.init()
    if args.step == "correctness":
        cases = gpu_steps.check_cases(args.tiny)
        context = None
    else:
        from .measure import Timer, device_name, versions

        cases = gpu_steps.timing_cases(args.tiny)
        timer = Timer(args.device, rep_ms=args.rep_ms, min_sample_ms=2.0, max_calls=5)
        meta = {"run_id": time.strftime("%Y%m%dT%H%M%S"),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preset": "gpu-check",
                "device": args.device, "device_name": device_name(args.device),
                "device_slug": args.device_slug, **versions(),
                "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "rounds": args.rounds}
        context = gpu_steps.tf32_dots(True)  # PyTorch's default, as the capture assumed
        context.__enter__()
    _listen_to_compiles()
    _send({"type": "ready"})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("end"):
            break
        index, why = command["run"], command.get("why")
        case = cases[index]
        try:
            if args.step == "correctness":
                status, text = _correctness_case(case, args.device)
            else:
                status, text = _timing_case(case, args.device, why, timer, meta, args.rounds)
        except Exception as exc:  # the step's own code failed: this case only
            import traceback

            traceback.print_exc()
            status, text = "error", f"  error   case {index}: {type(exc).__name__}: {exc}"[:300]
        healthy = cuda_healthy(args.device)
        _send({"type": "done", "index": index, "status": status, "line": text,
               "cuda_ok": healthy})
        if not healthy:
            return EXIT_CUDA_BROKEN
    if context is not None:
        context.__exit__(None, None, None)
    return 0


# --- the parent ----------------------------------------------------------------------------------


class CaseProcess:
    """The parent's handle on the child of one step: starts it when a case needs it, sends it
    one case at a time, and replaces it after it died, hung or broke its CUDA context.

    ``on_rows(sink, rows)`` records rows as they come; ``on_compile(hit, name)`` counts compiles;
    ``log`` takes text; ``children`` is the run's set of live processes (the watchdog ends their
    process groups)."""

    def __init__(self, step: str, argv_tail: list[str], log, on_rows, on_compile,
                 children: set, env: dict | None = None):
        self.step, self.argv_tail, self.log = step, argv_tail, log
        self.on_rows, self.on_compile, self.children = on_rows, on_compile, children
        self.env = env
        self.process: subprocess.Popen | None = None
        self.messages: queue.Queue = queue.Queue()
        self.starts = 0

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "dynconv.autotune.gpu_child", "--step", self.step,
                *self.argv_tail]

    def _pump(self, process: subprocess.Popen, messages: queue.Queue) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(PREFIX):
                try:
                    messages.put(json.loads(line[len(PREFIX):]))
                    continue
                except ValueError:
                    pass
            self.log(line.split("\r")[-1])  # progress bars: keep their last state
        messages.put(None)  # end of output: the process ended

    def _next(self, timeout: float) -> dict | None | str:
        """The next message; None when the child's output ended; "timeout"."""
        end = time.monotonic() + timeout
        while True:
            try:
                message = self.messages.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                return "timeout"
            if message is None or message.get("type") != "compile":
                return message
            self.on_compile(message["hit"], message["name"])

    def _end_process(self, exit_wait_s: float = 0.0) -> str:
        """Kill the child's process group if it still runs after ``exit_wait_s``; its exit
        status as text."""
        process, self.process = self.process, None
        if process is None:
            return ""
        try:
            process.wait(exit_wait_s)
        except subprocess.TimeoutExpired:
            kill_group(process)
        self.children.discard(process)
        code = process.returncode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        if code == EXIT_CUDA_BROKEN:
            return f"exit code {code}: CUDA context broken"
        return f"exit code {code}"

    def start(self, timeout: float) -> str | None:
        """Start the child and wait for it to be ready; None, or why it did not start."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.messages = queue.Queue()
        self.starts += 1
        started = time.monotonic()
        try:
            self.process = subprocess.Popen(
                self._argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        except OSError as exc:
            self.process = None
            return f"could not start its process: {exc}"
        self.children.add(self.process)
        threading.Thread(target=self._pump, args=(self.process, self.messages),
                         daemon=True).start()
        message = self._next(timeout)
        if isinstance(message, dict) and message.get("type") == "ready":
            self.log(f"  ({self.step}: case process {self.process.pid} ready in "
                     f"{time.monotonic() - started:.1f} s)")
            return None
        how = "not ready in time" if message == "timeout" else "ended before it was ready"
        return f"its process {how} ({self._end_process()})"

    def run(self, index: int, why: str | None, timeout: float, start_timeout: float
            ) -> dict | str:
        """Run case ``index`` in the child (starting one if needed): its ``done`` message, or
        why there is none (the child could not start, died, or ran past ``timeout``)."""
        if self.process is None:
            reason = self.start(start_timeout)
            if reason:
                return reason
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"run": index, "why": why}) + "\n")
            self.process.stdin.flush()
        except OSError:
            return f"its process ended ({self._end_process()})"
        end = time.monotonic() + timeout
        while True:
            message = self._next(end - time.monotonic())
            if message == "timeout":
                return f"no result within {timeout:.0f} s: its process was killed " \
                       f"({self._end_process()})"
            if message is None:
                return f"its process died ({self._end_process(5.0)})"
            if message.get("type") == "rows":
                self.on_rows(message["sink"], message["rows"])
            elif message.get("type") == "done" and message.get("index") == index:
                if not message.get("cuda_ok", True):
                    self.log(f"  ({self.step}: CUDA context broken after this case: the next "
                             f"case runs in a fresh process; {self._end_process(10.0)})")
                return message

    def close(self) -> None:
        process = self.process
        if process is not None and process.poll() is None and process.stdin is not None:
            try:
                process.stdin.write(json.dumps({"end": True}) + "\n")
                process.stdin.flush()
                process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._end_process()


def kill_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process's group (it was started in a session of its own), SIGKILL after
    ``grace_s``; waits for the process."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(child_main())
