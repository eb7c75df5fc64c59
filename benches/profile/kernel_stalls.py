#!/usr/bin/env python3
"""Where one kernel's warps wait, from Nsight Compute's source-level sampling.

Usage (on the GPU machine; `gpu-bundle/profile-kernel` runs all of it):
    ncu --clock-control none --kernel-name regex:NAME --launch-skip 20 --launch-count 1 \
        --section SourceCounters --section WarpStateStats --section SpeedOfLight -o rep \
        gpu-bundle/oxtune bench-train --steps 1 --warmup 1 [ARGS]
    ncu -i rep.ncu-rep --page source --csv --print-source sass > source.csv
    python3 kernel_stalls.py source.csv [TOP]

Prints the stall reasons over all samples, the samples per region and the TOP (default 25)
instructions with the most samples. Regions follow the warp roles of a warp-specialized kernel:
the code before the first `setmaxnreg`, the code after each `setmaxnreg` (USETMAXREG: its
TRY_ALLOC side is the consumers', its DEALLOC side the producers'), split further at each block
barrier (BAR.SYNC). The out-of-line wait loops that ptxas places after the last EXIT (an mbarrier
try_wait and a branch back) count for the region of the branch that first jumps to them.
"""
import collections
import sys

from step_kernels import header_rows  # its neighbour here and in gpu-bundle/


def load(path):
    """(header index, instruction rows) of an `ncu --page source --csv --print-source sass` file."""
    rows = header_rows(
        path, ("Source", "Warp Stall Sampling (All Samples)"), "was the report exported with --page source?"
    )
    idx = {name: i for i, name in enumerate(rows[0])}
    data = [r for r in rows[1:] if len(r) == len(rows[0])]
    if not data:
        sys.exit(f"{path}: no instruction rows after the header")
    return idx, data


def count(row, i):
    v = row[i].replace(",", "")
    return int(v) if v.isdigit() else 0


def regions(data, src):
    """A region label per instruction (see the module docstring)."""
    labels, label, role, barrier = [], "entry", "entry", 0
    last_exit = max((k for k, r in enumerate(data) if "EXIT" in r[src]), default=len(data) - 1)
    for k, r in enumerate(data):
        text = r[src]
        if "USETMAXREG" in text:
            role = "consumers" if "TRY_ALLOC" in text else "producers" if "DEALLOC" in text else "setmaxnreg"
            barrier = 0
        elif "BAR.SYNC" in text:
            barrier += 1
        label = role if barrier == 0 else f"{role} after barrier {barrier}"
        labels.append(label if k <= last_exit else None)
    # Wait loops past the last EXIT: each runs from an address that a branch before it jumps to up
    # to the next such address, and counts for the region of the first branch that jumps there.
    address = {r[0]: k for k, r in enumerate(data)}
    entered = {}
    for j, r in enumerate(data[: last_exit + 1]):
        if "BRA" in r[src]:
            k = address.get(r[src].split()[-1])
            if k is not None and k > last_exit:
                entered.setdefault(k, labels[j])
    starts = sorted(entered)
    for i, k0 in enumerate(starts):
        for m in range(k0, starts[i + 1] if i + 1 < len(starts) else len(data)):
            labels[m] = entered[k0] + " (wait loops)"
    labels = [label or "after the last EXIT" for label in labels]
    return labels


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    idx, data = load(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    src, samples = idx["Source"], idx["Warp Stall Sampling (All Samples)"]
    # The stall columns: reason (the column's name without "stall_") -> column index.
    stalls = {n[len("stall_") :]: i for n, i in idx.items() if n.startswith("stall_") and "Not Issued" not in n}
    by_region = collections.defaultdict(lambda: [0, collections.Counter()])
    for label, r in zip(regions(data, src), data):
        by_region[label][0] += count(r, samples)
        for w, i in stalls.items():
            by_region[label][1][w] += count(r, i)
    total = sum(n for n, _ in by_region.values())
    if total == 0:
        sys.exit(f"{sys.argv[1]}: no samples (was the SourceCounters section collected?)")
    reasons = collections.Counter()
    for _, why in by_region.values():
        reasons.update(why)  # (keeps reasons with no samples, as the regions' counters do)
    # ncu's CSV leaves some reasons out (the warpgroup products' own stalls, for one).
    unlisted = 1 - sum(reasons.values()) / total
    print(
        f"{total} samples; stall reasons: "
        + ", ".join(f"{n} {v / total:.1%}" for n, v in reasons.most_common(8))
        + f"; reasons the CSV does not name {unlisted:.1%}"
    )
    print("\nshare  region: its main stall reasons")
    for label, (n, why) in sorted(by_region.items(), key=lambda x: -x[1][0]):
        if n:
            reasons_text = ", ".join(f"{w} {v / n:.0%}" for w, v in why.most_common(4))
            print(f"{n / total:5.1%}  {label}: {reasons_text}")
    print(f"\nshare  line  instruction: its main stall reasons (top {top})")
    ranked = sorted(range(len(data)), key=lambda k: -count(data[k], samples))[:top]
    for k in ranked:
        r = data[k]
        why = sorted(((count(r, i), w) for w, i in stalls.items()), reverse=True)[:3]
        reasons_text = ", ".join(f"{w} {v}" for v, w in why if v)
        print(f"{count(r, samples) / total:5.1%} {k:5d}  {r[src].strip()[:64]:64s} {reasons_text}")


if __name__ == "__main__":
    main()
