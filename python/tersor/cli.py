"""``tersor`` command line: ``tersor bench [--family F] [--device cpu|cuda] [--json PATH] [--plot PATH.png]``."""

from __future__ import annotations

import argparse
import sys

import torch


def _bench(args) -> int:
    from .bench import BenchContext
    from .bench import report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("tersor bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    ctx = BenchContext(device=device, quick=args.quick)
    results = report.run(args.family, ctx)
    record = report.to_record(results, ctx)
    print()
    print(f"device: {record['device']}   torch {record['torch']}   commit {record['commit'][:12]}   {record['date']}")
    print("ratio = baseline time / tersor time (> 1: tersor is faster)")
    print(report.format_table(results))
    if args.json:
        report.write_json(record, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        report.write_plot(results, record, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tersor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmarks against the strongest baselines on this machine")
    b.add_argument("--family", action="append", help="benchmark family (repeatable); default: all")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    b.add_argument("--json", help="write the JSON record here")
    b.add_argument("--plot", help="write a PNG plot of the speed-ups here")
    b.add_argument("--quick", action="store_true", help="few shapes and repeats (smoke test)")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
