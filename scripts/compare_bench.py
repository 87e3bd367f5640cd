"""Compares two `tersor bench --json` records of the same benchmarks (e.g. an old build against a new one, run
on the same machine in the same session): per row, tersor's time and its ratio to the baseline in each, and
new/old. Rows are matched by (family, op, shape, dtype).

    python scripts/compare_bench.py OLD.json NEW.json [--tolerance 0.10]

Exits 1 when a row's ratio dropped by more than the tolerance (default 10 %, the noise of a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys


def _rows(path):
    record = json.load(open(path))
    return record, {(r["family"], r["op"], r["shape"], r["dtype"]): r for r in record["results"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    old_rec, old = _rows(args.old)
    new_rec, new = _rows(args.new)
    print(f"old: {old_rec.get('commit', '?')[:12]}  new: {new_rec.get('commit', '?')[:12]}  ({new_rec.get('device')})")
    print(f"{'family':10} {'op':34} {'shape':28} {'dtype':9} {'old ms':>9} {'new ms':>9} "
          f"{'old ratio':>9} {'new ratio':>9} {'new/old':>8}")
    worse = []
    for key in sorted(old.keys() & new.keys()):
        o, n = old[key], new[key]
        ro, rn = o.get("ratio"), n.get("ratio")
        rel = rn / ro if ro and rn else float("nan")
        flag = ""
        if ro and rn and rel < 1 - args.tolerance:
            worse.append(key)
            flag = "  <-- slower"
        print(f"{key[0]:10} {key[1][:34]:34} {key[2][:28]:28} {key[3][:9]:9} {o['tersor_ms']:9.3f} "
              f"{n['tersor_ms']:9.3f} {ro or float('nan'):9.3f} {rn or float('nan'):9.3f} {rel:8.3f}{flag}")
    for key in sorted(old.keys() ^ new.keys()):
        print(f"only in {'old' if key in old else 'new'}: {key}")
    print(f"{len(old.keys() & new.keys())} rows compared, {len(worse)} slower by more than {args.tolerance:.0%}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
