"""`zenlm export --model RUN_OR_MODEL --format hf|gguf --out PATH [--dtype fp32|fp16|bf16] [--quantize q8_0]`.

Anything ``zenlm.load`` reads (a run folder, a Hugging Face folder, a GGUF file, ``smollm2``, a
hub id) becomes a Hugging Face folder that transformers loads, or one GGUF file that llama.cpp
loads. The model may also come first, without ``--model``. The dtype names are the ones every
command uses; GGUF's own names (f32, f16, q8_0) are read too, as before.
"""

from __future__ import annotations

from pathlib import Path

from zenlm.cli.common import MODEL_HELP, add_model_arg

HF_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GGUF_DTYPES = {"fp32": "f32", "fp16": "f16"}
OLD_NAMES = {"f32": "fp32", "f16": "fp16"}  # --dtype as it was spelled before


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model as a Hugging Face folder or a GGUF file")
    p.add_argument("source", nargs="?", metavar="RUN_OR_MODEL", help=f"{MODEL_HELP} (or --model)")
    add_model_arg(p, required=False)
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True,
                   help="hf: the folder to write; gguf: the .gguf file (or a folder to put it in)")
    p.add_argument("--dtype", default="fp32", metavar="fp32|fp16|bf16",
                   help="weights: fp32 (exact, default), fp16, or bf16 (hf only)")
    p.add_argument("--quantize", choices=["none", "q8_0"], default="none",
                   help="q8_0: GGUF's 8-bit blocks (gguf only)")
    p.set_defaults(func=run)


def _name(model: str) -> str:
    """A short name for the file: the run folder's, the GGUF file's, or the hub id's last part."""
    return Path(str(model).rstrip("/")).stem or "model"


def _options(args) -> tuple[str, str, str]:
    """(model, dtype, quantize) from the flags, old spellings included, or a one-line error."""
    from zenlm.errors import ConfigError, InteropError

    if args.source and args.model and args.source != args.model:
        raise ConfigError(f"two models given: {args.source} and --model {args.model}")
    model = args.source or args.model
    if not model:
        raise ConfigError("name the model to export: zenlm export --model RUN_OR_MODEL ...")
    dtype, quantize = OLD_NAMES.get(args.dtype, args.dtype), args.quantize
    if dtype == "q8_0":  # --dtype q8_0, as it was spelled before --quantize
        dtype, quantize = "fp32", "q8_0"
    if dtype not in HF_DTYPES:
        raise ConfigError(f"unknown dtype {args.dtype!r}: choose {', '.join(HF_DTYPES)}")
    if args.format == "hf" and quantize != "none":
        raise InteropError(f"--quantize {quantize} is a GGUF quantization: use --format gguf")
    if args.format == "gguf" and dtype not in GGUF_DTYPES:
        raise InteropError(f"GGUF files hold {' or '.join(GGUF_DTYPES)} (or --quantize q8_0), not {dtype}")
    return model, dtype, quantize


def run(args) -> int:
    import zenlm

    model, dtype, quantize = _options(args)
    loaded = zenlm.load(model, key_file=args.key_file)
    if args.format == "gguf" and hasattr(loaded.model, "encode"):
        from zenlm.errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(f"{model} is an encoder-decoder: GGUF here holds decoders; "
                                           f"use --format hf (a Marian folder)")
    if args.format == "hf":
        out = zenlm.export_hf(loaded, args.out, dtype=HF_DTYPES[dtype])
        print(f"wrote {out}/ (Hugging Face {HF_DTYPES[dtype]} folder)")
        return 0
    from zenlm.interop.gguf_export import gguf_architecture

    kind = quantize if quantize != "none" else GGUF_DTYPES[dtype]
    out = Path(args.out)
    if out.is_dir():
        out = out / f"{_name(model)}-{kind}.gguf"
    out = zenlm.export_gguf(loaded, out, dtype=kind, name=_name(model))
    arch = gguf_architecture(loaded.model.config)
    print(f"wrote {out} (GGUF {arch}, {kind}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0
