"""Checkpoints and run folders on disk: safetensors weights, a state file, checksums, atomic writes.

A checkpoint is a folder ``checkpoints/step_NNNNNNNN/`` holding ``model.safetensors`` (weights
only: safe to open from anyone), ``state.pt`` (optimizer, schedule, RNG and data position,
loaded with ``weights_only=True``) and ``meta.json`` (step, config, sha256 of each file). It is
written under a temporary name and renamed into place, then the ``latest`` pointer is replaced
atomically: a crash at any instant leaves the previous checkpoint whole and pointed to.

Loading a model for inference needs only this module, the model and the tokenizer; it never
imports the training package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenlm.errors import CheckpointError

CKPT_DIR = "checkpoints"
LATEST = "latest"


# ----------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 less the umask), read once: temporary files
    (mkstemp, safetensors) are owner-only, which exported models and run folders should not be."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for writers that want a file name (GGUF, safetensors).

    When the block ends without an error the file is flushed to disk and renamed over ``path``
    (so readers see the old file or the whole new one, never half of one); on an error the
    temporary file is removed and ``path`` is left as it was. The file gets the permissions a
    plain ``open`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())  # after the writer: it may have replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict, train_state: dict | None,
                    config: dict[str, Any], keep_last: int = 2) -> Path:
    """Write a complete checkpoint folder, then point ``latest`` at it; prune older ones."""
    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = ["model.safetensors"]
        if train_state is not None:
            torch.save(train_state, tmp / "state.pt")
            files.append("state.pt")
        for f in files:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        meta = {"step": step, "config": config, "sha256": {f: sha256_file(tmp / f) for f in files}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        final = root / name
        if final.exists():  # re-saving the same step: replace it whole, but move the old one
            aside = root / f".{name}.replaced"  # aside (not delete it) until the new one is in
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(aside, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        if old.name != name:
            # Rename first (atomic), then delete: a kill in the middle of rmtree must not leave
            # a half-deleted step_* folder that looks like a checkpoint.
            trash = root / f".{old.name}.deleting"
            shutil.rmtree(trash, ignore_errors=True)  # left by an earlier crash
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    for stale in root.glob(".step_*"):  # temp folders left by a crash
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    return ckpt if ckpt.is_dir() else None


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Return meta.json after checking every file against its recorded sha256."""
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: meta.json is not valid JSON") from None
    for name, digest in meta.get("sha256", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its checksum")
    return meta


def load_checkpoint(ckpt: Path, *, with_state: bool = True) -> tuple[dict, dict | None, dict[str, Any]]:
    """(model weights, training state or None, meta), verified."""
    import torch
    from safetensors.torch import load_file

    meta = verify_checkpoint(ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    state = None
    if with_state and (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    return weights, state, meta


# ----------------------------------------------------------------------------------------------
# Run folders -> a ready model


@dataclass
class LoadedModel:
    """What inference and evaluation need: the model, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    step: int | None = None


def is_run_dir(path: str | os.PathLike) -> bool:
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


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """The latest checkpoint of a run folder, as an eval-mode model with its tokenizer."""
    from zenlm.config import TransformerConfig, build
    from zenlm.model import Transformer
    from zenlm.tokenizer import Tokenizer

    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder not found: {run}")
    if not is_run_dir(run):
        raise CheckpointError(f"{run} is not a zenlm run folder (no config.yaml and checkpoints/)")
    if is_finetune_run(run):
        raise CheckpointError(f"{run} is a fine-tuned run on top of a base model: load it with "
                              f"zenlm.load({str(run)!r})")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"run {run} has no finished checkpoint yet")
    weights, _, meta = load_checkpoint(ckpt, with_state=False)
    config = build(TransformerConfig, meta["config"]["model"], prefix="model.")
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    return LoadedModel(model, tokenizer, str(run), meta["step"])
