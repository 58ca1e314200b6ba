#!/bin/bash
# The allocator A/B of the fourth pass: alternating processes, each one
# cpu-formulations run over the batch-4 cases of make report (its six layers, 128 channels at
# 7x7 and the 1-D layer), auto / grouped / loop against the static conv, 1 thread, 5 rounds.
# Series alloc2 (process CPU time) and alloc2w (wall clock) ran this script; series alloc ran
# the same with "glibc" in place of "both", providers auto,grouped, process time only.
# Geometric means: python allocator_geomean.py allocator_t1.csv
set -e
OUT=${OUT:-/tmp/alloc}
for rep in 1 2 3; do
  for setting in default thp both; do
    case $setting in
      default) envs="" ;;
      thp) envs="THP_MEM_ALLOC_ENABLE=1" ;;
      both) envs="THP_MEM_ALLOC_ENABLE=1 MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000" ;;
    esac
    for clock in process wall; do
      env $envs python -m dynconv.autotune cpu-formulations --set quick --filter "B4 " \
        --providers auto,grouped,loop --modes fwd,fwd+bwd --rounds 5 --threads 1 \
        --clock $clock --out "$OUT/$clock" --tag "${setting}_${rep}" > /dev/null
    done
  done
done
