"""Page faults per call, each provider alone in a fresh process against all of them in one.

``make report`` times every provider in the same process, interleaved, so each call finds the
allocator as every provider's earlier calls left it. This script counts what that costs: for
the rows that moved between runs, per setting (``--allocator`` of bench: as the machine comes,
and glibc's heap kept), it runs

- ``alone``: one fresh process per provider, which calls only that provider (as a training loop
  does): 3 warm-up calls, then CALLS calls;
- ``shared``: one fresh process for the case, the four providers warmed up in turn and then
  called in turn, CALLS rounds (the bench's situation, without its samples' lengths);

and prints each provider's minor page faults per call (median: a fault is a 4 KiB page the
kernel hands over, zeroed, because the allocator returned it to the OS after the last call) and
its fastest call in ms. 1 thread, fp32.

Run from the repository root in make report's environment:
``python perf_reports/cpu_reruns/page_faults.py`` (about 5 minutes on 2 cores); its output is
``page_faults.txt``.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from dynconv.autotune import bench

PROVIDERS = ("static", "loop", "grouped", "auto")
SETTINGS = ("default", "steady-heap")
CALLS = 30
WARMUPS = 3
# (group, shape name, batch, mode): the rows outside the rule in one run or another
ROWS = (("layers", "features.3.depthwise", 4, "fwd+bwd"),
        ("layers", "layer4.0.conv2", 4, "fwd+bwd"),
        ("layers", "layer2.0.conv1", 4, "fwd"),
        ("1d-3d", "video-3d", 2, "fwd+bwd"),
        ("batch", "c128@7", 4, "fwd+bwd"))


def find_case(group: str, name: str, batch: int) -> bench.Case:
    for case in bench.preset_cases("quick", "cpu"):
        if (case.group, case.shape.name, case.batch) == (group, name, batch):
            return case
    raise LookupError(f"no quick case {group} {name} B{batch}")


def timed_call(fn) -> tuple[int, float]:
    """(minor page faults, ms) of one call of ``fn``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, ms


def child(row: tuple, providers: list[str]) -> dict:
    """In this process: each of ``providers`` warmed up, then called in turn CALLS times."""
    torch.set_num_threads(1)
    group, name, batch, mode = row
    case = find_case(group, name, batch)
    tensors = bench.make_inputs(case, "cpu")
    fns = {p: bench.mode_fn(mode, *bench.forward_fn(p, case, tensors)) for p in providers}
    for fn in fns.values():
        for _ in range(WARMUPS):
            fn()
    calls = {p: [] for p in providers}
    for _ in range(CALLS):
        for p, fn in fns.items():
            calls[p].append(timed_call(fn))
    return {p: {"faults": statistics.median(f for f, _ in c), "min_ms": min(ms for _, ms in c)}
            for p, c in calls.items()}


def run_child(row: tuple, providers: list[str], setting: str) -> dict:
    env = bench.allocator_environment(setting, dict(os.environ))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([row, providers])],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        row, providers = json.loads(sys.argv[2])
        print(json.dumps(child(tuple(row), providers)))
        return
    header = f"{'row':44} {'setting':12} {'provider':8} {'alone: faults':>14} {'ms':>8}" \
             f" {'shared: faults':>15} {'ms':>8}"
    print(header)
    for row in ROWS:
        for setting in SETTINGS:
            shared = run_child(row, list(PROVIDERS), setting)
            for provider in PROVIDERS:
                alone = run_child(row, [provider], setting)[provider]
                label = f"{row[0]} {row[1]} B{row[2]} {row[3]}"
                print(f"{label:44} {setting:12} {provider:8} {alone['faults']:14.0f} "
                      f"{alone['min_ms']:8.2f} {shared[provider]['faults']:15.0f} "
                      f"{shared[provider]['min_ms']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
