"""``tersor`` command line.

* ``tersor bench [--family F] [--device cpu|cuda] [--json PATH] [--plot PATH.png] [--quick]``
* ``tersor compress MODEL_DIR OUT_DIR --method e8p2|e8p3|e8p4|aqlm-2x8|aqlm-1x16|2:4|bsr:D|lossless
  [--calibration FILE.txt]``
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch


def _bench(args) -> int:
    from .bench import BenchContext
    from .bench import report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("tersor bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    ctx = BenchContext(device=device, quick=args.quick, families=tuple(args.family or ()))
    results, errors = [], []

    def _terminated(signum, frame):  # `timeout` sends SIGTERM: keep the rows measured so far
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        report.run(args.family, ctx, results=results, errors=errors)
    except KeyboardInterrupt as e:
        errors.append(f"interrupted ({e or 'Ctrl-C'}): the record holds the rows finished before")
    finally:
        signal.signal(signal.SIGTERM, previous)
    record = report.to_record(results, ctx)
    if errors:
        record["errors"] = errors
    print()
    print(f"device: {record['device']}   torch {record['torch']}   commit {record['commit'][:12]}   {record['date']}")
    print("ratio = baseline time / tersor time (> 1: tersor is faster)")
    print(report.format_table(results))
    if args.json:
        report.write_json(record, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        report.write_plot(results, record, args.plot)  # the model family: size against fidelity
        print(f"wrote {args.plot}")
    elif report.write_model_plot(results, record):
        print(f"wrote {report.MODEL_PLOT} (model family: size against fidelity)")
    for e in errors:
        print(f"tersor bench: {e}", file=sys.stderr)
    return 1 if errors else 0


# ------------------------------------------------------------------------------------------- compress
METHODS = ("e8p2", "e8p3", "e8p4", "aqlm-2x8", "aqlm-1x16", "2:4", "2:4-bf16", "bsr:D", "lossless")


def method_config(method: str, calibrated: bool, finetune=None, **aqlm):
    """The ``tersor.quantize_`` config of a ``tersor compress --method`` name. ``calibrated``: calibration
    data will be given, so the data-aware variants are used (E8P with LDLQ, AQLM's output-error objective,
    Wanda pruning for 2:4 and BSR); without it the data-free ones (greedy E8P rounding, AQLM's weight error,
    magnitude pruning). ``bsr:D[:B]`` keeps the fraction
    ``D`` of the ``B x B`` blocks (``B`` 16, 32 or 64, default 64). ``2:4`` keeps each layer's dtype (a float32
    layer stores float32 values, exact on the CPU); ``2:4-bf16`` stores a float32 layer's values in bfloat16. ``aqlm`` options go to ``AQLMConfig``
    (``iters``, ``kmeans_iters``, ``beam_size``). ``finetune``: a :class:`tersor.FinetuneConfig` for the E8P and
    AQLM methods (ValueError for the others). Raises ValueError for an unknown name."""
    from .api import AQLMConfig, BlockSparseConfig, E8PConfig, LosslessConfig, Sparse24Config

    prune = "wanda" if calibrated else "magnitude"
    if method in ("e8p2", "e8p3", "e8p4"):
        return E8PConfig(bits=int(method[3]), ldlq=calibrated, finetune=finetune)
    if method == "aqlm-2x8":
        return AQLMConfig(num_codebooks=2, nbits=8, finetune=finetune, **aqlm)
    if method == "aqlm-1x16":
        return AQLMConfig(num_codebooks=1, nbits=16, finetune=finetune, **aqlm)
    if finetune is not None:
        raise ValueError(f"--finetune applies to the E8P and AQLM methods, not {method!r}")
    if method in ("2:4", "2:4-bf16"):
        return Sparse24Config(prune, compact=method == "2:4-bf16")
    if method == "lossless":
        return LosslessConfig()
    if method.startswith("bsr:"):
        parts = method.split(":")
        try:
            density = float(parts[1])
            blocksize = int(parts[2]) if len(parts) == 3 else 64
        except (ValueError, IndexError):
            density = None
        if density is None or len(parts) > 3:
            raise ValueError(f"--method {method!r}: expected bsr:DENSITY or bsr:DENSITY:BLOCKSIZE, e.g. bsr:0.5")
        return BlockSparseConfig(blocksize=blocksize, density=density, method=prune)
    raise ValueError(f"unknown --method {method!r}; one of {', '.join(METHODS)}")


def _read_calibration(path: str, limit: int) -> list[str]:
    if path == "corpus":  # --calibration without a file: tersor's own calibration split
        from .corpus import corpus_path

        path = corpus_path("calibration")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"--calibration {path}: no non-empty lines")
    return lines[:limit]


def _compress(args) -> int:
    import json
    import os
    import shutil
    import time

    from .api import quantize_, save

    try:
        finetune = None
        if args.finetune:
            if args.calibration is None:
                raise ValueError("--finetune needs calibration data: add --calibration (tersor's corpus) or "
                                 "--calibration FILE.txt")
            from .api import FinetuneConfig

            finetune = FinetuneConfig(steps=args.finetune)
        config = method_config(args.method, calibrated=args.calibration is not None, finetune=finetune)
    except ValueError as e:
        print(f"tersor compress: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"tersor compress: {args.model_dir} is not a Hugging Face model directory (no config.json)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoConfig

    t0 = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(args.model_dir, local_files_only=True)
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if (arch and args.model_class == "auto") else None
    if args.model_class not in ("auto", "AutoModel"):
        cls = getattr(transformers, args.model_class, None)
        if cls is None:
            print(f"tersor compress: transformers has no class {args.model_class!r}", file=sys.stderr)
            return 2
    cls = cls or transformers.AutoModel
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = cls.from_pretrained(args.model_dir, local_files_only=True, dtype=dtype).eval()
    print(f"loaded {args.model_dir} as {type(model).__name__} ({next(model.parameters()).dtype}) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    calibration = None
    if args.calibration is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
        texts = _read_calibration(args.calibration, args.max_calibration)
        calibration = [dict(tok(t, truncation=True, max_length=args.max_length, return_tensors="pt")) for t in texts]
        where = args.calibration
        if where == "corpus":
            from .corpus import corpus_path

            where = f"tersor's corpus ({corpus_path('calibration')})"
        print(f"calibration: {len(calibration)} lines of {where}", file=sys.stderr)
    report = quantize_(model, config, calibration=calibration, progress=True)
    save(model, args.out_dir)
    hf_config.save_pretrained(args.out_dir)  # the skeleton to load into: AutoConfig.from_pretrained(OUT_DIR)
    for name in sorted(os.listdir(args.model_dir)):  # tokenizer files, so OUT_DIR is a complete model directory
        if name.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges.", "spiece.")) or name.endswith(
                (".model", ".tiktoken")):
            shutil.copy2(os.path.join(args.model_dir, name), os.path.join(args.out_dir, name))
    with open(os.path.join(args.out_dir, "tersor_compress.json"), "w") as f:
        json.dump({"method": args.method, "config": report.config, "model_class": type(model).__name__,
                   "source": os.path.abspath(args.model_dir), "calibration": report.calibration}, f, indent=1)
    print(report)
    print(f"\nwrote {args.out_dir} ({report.bytes_before:,} -> {report.bytes_after:,} bytes in the compressed layers)")
    print(f"load it: with torch.device('meta'): m = transformers.{type(model).__name__}(AutoConfig.from_pretrained("
          f"{args.out_dir!r})); tersor.load(m, {args.out_dir!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tersor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmarks against the strongest baselines on this machine")
    b.add_argument("--family", action="append", help="benchmark family (repeatable); default: all")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    b.add_argument("--json", help="write the JSON record here")
    b.add_argument("--plot", help="write a PNG plot of the speed-ups here (the model family: size against "
                   "fidelity; without --plot that one goes to bench_out/model-size-fidelity.png)")
    b.add_argument("--quick", action="store_true", help="few shapes and repeats (smoke test)")
    b.set_defaults(func=_bench)
    c = sub.add_parser("compress", help="compress a local Hugging Face model directory and save it (tersor.save)",
                       description="Loads MODEL_DIR with transformers (local files only), compresses its linears "
                       "with tersor.quantize_ and writes OUT_DIR: model.safetensors + tersor_manifest.json "
                       "(tersor.save), config.json and the tokenizer files.")
    c.add_argument("model_dir")
    c.add_argument("out_dir")
    c.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)} (bsr:D keeps the fraction D of "
                   f"the 64x64 blocks; bsr:D:B for B x B blocks)")
    c.add_argument("--calibration", nargs="?", const="corpus",
                   help="a text file, one calibration sample per line (without a file: tersor's own calibration "
                   "corpus, tersor.corpus): E8P then uses LDLQ, 2:4 and BSR use Wanda, and every layer's relative "
                   "output error is reported")
    c.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                   help="E8P / AQLM: fine-tune each block for at most STEPS steps after quantizing it "
                   "(tersor.FinetuneConfig; needs --calibration)")
    c.add_argument("--max-calibration", type=int, default=128, help="use at most this many lines (default 128)")
    c.add_argument("--max-length", type=int, default=512, help="truncate calibration samples to this many tokens")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="load the model in this dtype (default: as stored)")
    c.add_argument("--model-class", default="auto", help="transformers class to load with (default: the config's "
                   "architectures[0], else AutoModel)")
    c.add_argument("--threads", type=int, help="torch.set_num_threads (1 is often fastest on a busy small CPU)")
    c.set_defaults(func=_compress)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
