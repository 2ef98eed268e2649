"""The checkpoint format: safetensors weights, a state file and checksums, saved whole or not at all.

A checkpoint is a folder ``checkpoints/step_NNNNNNNN/`` holding ``model.safetensors`` (weights
only: safe to open from anyone), ``state.pt`` (optimizer, schedule, RNG and data position,
loaded with ``weights_only=True``) and ``meta.json`` (step, config, sha256 of each file). It is
written under a temporary name and renamed into place, then the ``latest`` pointer is replaced
atomically: a crash at any instant leaves the previous checkpoint whole and pointed to.

With a key (``train.encrypt_key_file``) the three files are sealed (``zenlm.crypt``) as
``model.safetensors.zenc``, ``state.pt.zenc`` and ``meta.json.zenc``: serialised in memory and
sealed on the way to disk, so no plaintext weight, optimizer state or config is written.

This module stands on the bottom floor (it imports only ``zenlm.io``, ``zenlm.crypt`` and ``zenlm.errors``):
turning a run folder into a ready model is ``zenlm.interop.load``'s job, and loading never
imports the training package.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from zenlm.errors import CheckpointError
from zenlm.io import atomic_dir, atomic_write_text, remove_dir, sha256_bytes, sha256_file

CKPT_DIR = "checkpoints"
SEALED = ".zenc"
LATEST = "latest"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict, train_state: dict | None,
                    config: dict[str, Any], keep_last: int = 2, key=None) -> Path:
    """Write a complete checkpoint folder, then point ``latest`` at it; prune older ones.
    ``key`` (a ``zenlm.crypt.Key``): seal every file of it."""
    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    name = f"step_{step:08d}"
    with atomic_dir(root / name) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        if key is not None:
            _save_sealed(tmp, step, weights, train_state, config, key)
        else:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            files = ["model.safetensors"]
            if train_state is not None:
                torch.save(train_state, tmp / "state.pt")
                files.append("state.pt")
            meta = {"step": step, "config": config, "sha256": {f: sha256_file(tmp / f) for f in files}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # the folder's rename is the commit
    atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        if old.name != name:
            remove_dir(old)  # a kill midway leaves no half-deleted step_* that looks like a checkpoint
    for stale in root.glob(".step_*"):  # temporary folders left by a crash
        shutil.rmtree(stale, ignore_errors=True)
    return root / name


def _save_sealed(tmp: Path, step: int, weights: dict, train_state: dict | None,
                 config: dict[str, Any], key) -> None:
    import io

    import torch
    from safetensors.torch import save

    from zenlm.crypt import write_sealed

    blobs = {"model.safetensors": save(weights, metadata={"format": "pt"})}
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        blobs["state.pt"] = buf.getvalue()
    meta = {"step": step, "config": config, "encrypted": True,
            "sha256": {f: sha256_bytes(b) for f, b in blobs.items()}}
    blobs["meta.json"] = json.dumps(meta, indent=2).encode()
    for name, data in blobs.items():
        write_sealed(tmp / (name + SEALED), data, key)


def is_sealed_checkpoint(ckpt: Path) -> bool:
    return (ckpt / ("meta.json" + SEALED)).is_file()


def _open_sealed(ckpt: Path, key, with_state: bool) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(plaintext files, meta) of a sealed checkpoint, each checked against meta's sha256."""
    from zenlm.crypt import read_sealed

    if key is None:
        raise CheckpointError(f"checkpoint {ckpt} is encrypted: give its key (key_file=..., "
                              f"--key-file, train.encrypt_key_file or ZENLM_KEY)")
    meta = json.loads(read_sealed(ckpt / ("meta.json" + SEALED), key))
    files = {}
    for name, digest in meta.get("sha256", {}).items():
        if name == "state.pt" and not with_state:
            continue
        f = ckpt / (name + SEALED)
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {f.name} is missing")
        files[name] = read_sealed(f, key)
        if sha256_bytes(files[name]) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its checksum")
    return files, meta


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    return ckpt if ckpt.is_dir() else None


def verify_checkpoint(ckpt: Path, key=None) -> dict[str, Any]:
    """Return meta.json after checking every file against its recorded sha256."""
    if is_sealed_checkpoint(ckpt):
        return _open_sealed(ckpt, key, True)[1]
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


def load_checkpoint(ckpt: Path, *, with_state: bool = True,
                    key=None) -> tuple[dict, dict | None, dict[str, Any]]:
    """(model weights, training state or None, meta), verified; ``key`` opens a sealed one."""
    import torch
    from safetensors.torch import load_file

    if is_sealed_checkpoint(ckpt):
        import io

        from safetensors.torch import load

        files, meta = _open_sealed(ckpt, key, with_state)
        state = None
        if "state.pt" in files:
            state = torch.load(io.BytesIO(files["state.pt"]), weights_only=True, map_location="cpu")
        return load(files["model.safetensors"]), state, meta

    meta = verify_checkpoint(ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    state = None
    if with_state and (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    return weights, state, meta
