"""Re-measure chosen cases of ``cpu-formulations --set all`` alone (one process per case and
repeat): auto and loop against the grouped trick, fwd and fwd+bwd, 1 thread, process CPU time,
7 rounds. Fourth pass: the rows that the full run put outside the goal.

    python rerun_cases.py OUT.csv REPEATS "label substring" ["label substring" ...]
"""

import csv
import os
import subprocess
import sys

out, repeats, filters = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if filters and filters[0] == "--child":
    from dynconv.autotune import cpu_formulations as cf

    _, label_filter, repeat = filters
    rows = []
    for label, case in cf.selected_cases("all", label_filter):
        for row in cf.measure(case, ["auto", "loop"], 1, 7, ["fwd", "fwd+bwd"], "process",
                              "grouped"):
            rows.append({"label": label, "repeat": repeat, **row})
    new = not os.path.exists(out)
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    sys.exit(0)
for repeat in range(1, repeats + 1):
    for label_filter in filters:
        subprocess.run([sys.executable, __file__, out, str(repeats), "--child", label_filter,
                        str(repeat)], check=True)
