"""`zenlm export RUN_OR_MODEL --format hf|gguf --out PATH [--dtype f32|f16|q8_0]`.

Anything ``zenlm.load`` reads (a run folder, a Hugging Face folder, a GGUF file, ``smollm2``, a
hub id) becomes a Hugging Face folder that transformers loads, or one GGUF file that llama.cpp
loads.
"""

from __future__ import annotations

from pathlib import Path

HF_DTYPES = {"f32": "float32", "f16": "float16"}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model as a Hugging Face folder or a GGUF file")
    p.add_argument("model", metavar="RUN_OR_MODEL",
                   help="a run folder, Hugging Face folder, .gguf file, 'smollm2' or a hub id")
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True,
                   help="hf: the folder to write; gguf: the .gguf file (or a folder to put it in)")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32",
                   help="weights: f32 (exact, default), f16, or q8_0 (gguf only)")
    p.set_defaults(func=run)


def _name(model: str) -> str:
    """A short name for the file: the run folder's, the GGUF file's, or the hub id's last part."""
    return Path(str(model).rstrip("/")).stem or "model"


def run(args) -> int:
    import zenlm
    from zenlm.errors import InteropError

    if args.format == "hf" and args.dtype not in HF_DTYPES:
        raise InteropError(f"--dtype {args.dtype} is a GGUF quantization: use --format gguf, or "
                           f"--dtype {' or '.join(HF_DTYPES)} for a Hugging Face folder")
    loaded = zenlm.load(args.model)
    if args.format == "hf":
        out = zenlm.export_hf(loaded, args.out, dtype=HF_DTYPES[args.dtype])
        print(f"wrote {out}/ (Hugging Face {HF_DTYPES[args.dtype]} folder)")
        return 0
    from zenlm.interop.gguf_export import gguf_architecture

    out = Path(args.out)
    if out.is_dir():
        out = out / f"{_name(args.model)}-{args.dtype}.gguf"
    out = zenlm.export_gguf(loaded, out, dtype=args.dtype, name=_name(args.model))
    arch = gguf_architecture(loaded.model.config)
    print(f"wrote {out} (GGUF {arch}, {args.dtype}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0
