#!/usr/bin/env python3
"""Per-kernel GPU time of one training step, from Nsight Compute's CSV.

Usage (on the GPU machine; `gpu-bundle/profile` runs both steps):
    ncu --clock-control none --csv --print-units base --metrics gpu__time_duration.sum \
        gpu-bundle/oxtune bench-train --steps 1 --warmup 1 [ARGS] > step.csv
    python3 step_kernels.py step.csv [other.csv]

The timed step is the run of launches after the last-but-one optimizer update (the kernels whose
names contain "adamw") up to the last one. Kernels are grouped by name (template arguments and
parameter lists dropped); with a second CSV (another build, the same command) both are printed
side by side, ordered by the first.
"""
import collections
import csv
import re
import sys

UNIT_NS = {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6, "s": 1e9, "second": 1e9}


def header_rows(path, columns, hint):
    """The rows of an ncu CSV from its header on: the first row naming every one of `columns`
    (ncu prints its own lines before it); exits with `hint` when there is none."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    try:
        h = next(i for i, r in enumerate(rows) if all(c in r for c in columns))
    except StopIteration:
        sys.exit(f"{path}: no ncu CSV header ({', '.join(columns)}): {hint}")
    return rows[h:]


def launches(path):
    """(kernel name, ns) of every launch in the CSV, in launch order."""
    rows = header_rows(path, ("Kernel Name", "Metric Value"), "did ncu run?")
    hdr = rows[0]
    name, unit, value, metric = (hdr.index(k) for k in ("Kernel Name", "Metric Unit", "Metric Value", "Metric Name"))
    out = []
    for r in rows[1:]:
        if len(r) <= value or r[metric] != "gpu__time_duration.sum":
            continue
        if r[unit] not in UNIT_NS:
            sys.exit(f"{path}: unknown time unit {r[unit]!r}")
        out.append((r[name], float(r[value].replace(",", "")) * UNIT_NS[r[unit]]))
    return out


def timed_step(ks, path):
    """The launches of the last step: after the last-but-one cluster of optimizer kernels."""
    opt = [i for i, (n, _) in enumerate(ks) if "adamw" in n]
    clusters = []
    for i in opt:
        if clusters and i - clusters[-1][1] < 64:
            clusters[-1][1] = i
        else:
            clusters.append([i, i])
    if len(clusters) < 2:
        sys.exit(f"{path}: {len(clusters)} optimizer updates found, 2 needed (--steps 1 --warmup 1)")
    return ks[clusters[-2][1] + 1:clusters[-1][1] + 1]


def group(step):
    agg = collections.defaultdict(lambda: [0.0, 0])
    for n, t in step:
        key = re.sub(r"\(.*", "", n).split("<")[0].strip()
        agg[key][0] += t
        agg[key][1] += 1
    return agg


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    runs = []
    for path in sys.argv[1:]:
        step = timed_step(launches(path), path)
        runs.append((path, group(step), len(step), sum(t for _, t in step)))
    for path, _, n, total in runs:
        print(f"{path}: timed step {n} launches, {total / 1e6:.2f} ms of kernel time")
    first = runs[0][1]
    keys = sorted(set().union(*(r[1] for r in runs)), key=lambda k: -first.get(k, [0.0])[0])
    head = "".join(f"{'ms':>9} {'launches':>8}" for _ in runs)
    print(f"{head}  kernel")
    for k in keys:
        cols = "".join(f"{r[1][k][0] / 1e6:9.2f} {r[1][k][1]:8d}" if k in r[1] else f"{'-':>9} {'-':>8}" for r in runs)
        print(f"{cols}  {k[:110]}")


if __name__ == "__main__":
    main()
