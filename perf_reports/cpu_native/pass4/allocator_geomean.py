"""Geometric mean over make report's six layers (batch 4, fwd and fwd+bwd, ratio to the static
conv) per allocator setting and repeat, from allocator_t1.csv (fourth pass)."""

import collections
import csv
import statistics
import sys

SIX = {"64->64 k3 s1 @56", "64->128 k3 s2 @56", "64->128 k1 s2 @56", "256->256 k3 s1 @14",
       "512->512 k3 s1 @7", "dw 144->144 k3 s1 @56"}
path = sys.argv[1] if len(sys.argv) > 1 else "allocator_t1.csv"
ratios = collections.defaultdict(list)
for r in csv.DictReader(open(path)):
    if r["shape"] in SIX and r["batch"] == "4":
        key = (r["series"], r["clock"], r["setting"], r["mode"], r["provider"], r["repeat"])
        ratios[key].append(float(r["ratio"]))
means = collections.defaultdict(list)
for (series, clock, setting, mode, provider, _), values in sorted(ratios.items()):
    if len(values) == 6:
        means[(series, clock, mode, provider, setting)].append(statistics.geometric_mean(values))
for key, values in sorted(means.items()):
    print(" ".join(key), "|", " ".join(f"{v:.3f}" for v in values),
          f"| median {statistics.median(values):.3f}")
