"""The lineage card: what a saved model came from, signed, with the sha256 of every file.

``card.json`` in a run or export folder names the parent model (and the hash of its files), the
data (the prepared manifest and shards, or the fine-tuning files, each with its sha256, and
what PII scrubbing removed), the config, steps and tokens, the privacy budget spent (``null``
without DP), the zenlm version and the sha256 of every other file in the folder. It is signed
over its canonical JSON (sorted keys, no spaces): with Ed25519 when a key pair is set up
(``zenlm card keygen``; the private key in the key folder or at ``ZENLM_SIGNING_KEY``), else
with HMAC-SHA256 under a per-user secret made on first use. The card says which; an HMAC card
can only be verified where its secret is, an Ed25519 card anywhere its public key is trusted.

``verify_card`` checks the signature first (so the card itself can be believed), then every
file, then the data and parent that are still on this machine, and raises
:class:`~zenlm.errors.CardError` naming the first thing that does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from zenlm.errors import CardError
from zenlm.io import atomic_write_json, atomic_write_text, sha256_bytes, sha256_file

CARD = "card.json"
FORMAT = "zenlm-card/1"
SIGNING_KEY, PUBLIC_KEY, HMAC_KEY = "signing_key.pem", "signing_key.pub", "card_hmac.key"
DATA_FILES = ("manifest.json", "tokenizer.json", "train.bin", "val.bin")
# Folders of views made from a finished run (``zenlm report``), written after its card: not the
# model, not hashed, so making a report does not break ``zenlm card verify``.
VIEWS = ("report",)


# ----------------------------------------------------------------------------------------------
# hashes


def _visible(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``folder`` except temporary ones (names starting with '.') and ``exclude``."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) \
                and rel.as_posix() not in exclude and rel.parts[0] not in VIEWS:
            out.append(p)
    return out


def file_hashes(folder: str | os.PathLike, exclude: tuple[str, ...] = (CARD,)) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in _visible(folder, exclude)}


def tree_sha256(path: str | os.PathLike) -> str:
    """One digest for a file (its sha256) or a folder (of its files' relative paths and sha256)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    lines = "".join(f"{rel}\0{digest}\n" for rel, digest in file_hashes(p, exclude=()).items())
    return sha256_bytes(lines.encode("utf-8"))


def parent_entry(name: str | None) -> dict[str, Any] | None:
    """The parent model as the card records it: the name given, where it resolved to, the hash
    of its files and, when it carries a card, that card's signature (the lineage chains)."""
    if not name:
        return None
    where: Path | None = Path(name).expanduser()
    if not where.exists():
        try:  # a built-in name or a cached hub id: resolved by the loader (imported lazily)
            from zenlm.interop.load import resolve

            kind, found = resolve(name)
            where = found if isinstance(found, Path) else None
        except Exception:
            where = None
    entry: dict[str, Any] = {"model": str(name), "path": str(where) if where else None,
                             "sha256": tree_sha256(where) if where else None, "card_signature": None}
    if where is not None and (where / CARD).is_file():
        try:
            entry["card_signature"] = json.loads((where / CARD).read_text())["signature"]["value"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return entry


def data_entry(path: str | os.PathLike) -> dict[str, Any]:
    """A prepared data folder (manifest, tokenizer and shards, with the manifest's own record
    of its sources and of PII scrubbing) or one data file, with sha256 of each file."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        files = {f: sha256_file(p / f) for f in DATA_FILES if (p / f).is_file()}
        entry: dict[str, Any] = {"path": str(p), "files": files}
        if (p / "manifest.json").is_file():
            manifest = json.loads((p / "manifest.json").read_text())
            entry["sources"] = manifest.get("sources")
            entry["pii"] = manifest.get("pii")
        return entry
    return {"path": str(p), "files": {p.name: sha256_file(p)} if p.is_file() else {}}


# ----------------------------------------------------------------------------------------------
# keys and signatures


def key_dir() -> Path:
    """Where the user's signing keys live: ZENLM_HOME, else ~/.config/zenlm."""
    return Path(os.environ.get("ZENLM_HOME") or "~/.config/zenlm").expanduser()


def signing_key_path() -> Path:
    return Path(os.environ.get("ZENLM_SIGNING_KEY") or key_dir() / SIGNING_KEY).expanduser()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def keygen(folder: str | os.PathLike | None = None, *, force: bool = False) -> tuple[Path, Path]:
    """An Ed25519 key pair: the private key (PKCS#8 PEM, 0600) and the public key (hex)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder).expanduser() if folder else key_dir()
    priv_path, pub_path = folder / SIGNING_KEY, folder / PUBLIC_KEY
    if priv_path.exists() and not force:
        raise CardError(f"{priv_path} already exists (pass --force to replace it: cards it signed "
                        f"then verify only with the old public key)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    priv_path.unlink(missing_ok=True)
    _write_private(priv_path, pem)
    atomic_write_text(pub_path, _public_raw(key).hex() + "\n")
    return priv_path, pub_path


def _public_raw(private) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key_id(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:16]


def _load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CardError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CardError(f"{path} is not an Ed25519 private key")
    return key


def _hmac_secret(create: bool) -> bytes | None:
    path = key_dir() / HMAC_KEY
    if not path.is_file():
        if not create:
            return None
        try:
            _write_private(path, secrets.token_bytes(32).hex().encode() + b"\n")
        except FileExistsError:  # another process made it first
            pass
    return bytes.fromhex(path.read_text().strip())


def _payload(card: dict) -> bytes:
    body = {k: v for k, v in card.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(card: dict) -> dict:
    """``card`` with a ``signature``: Ed25519 when a signing key is set up, else HMAC-SHA256."""
    card = json.loads(json.dumps({k: v for k, v in card.items() if k != "signature"}))
    path = signing_key_path()
    if path.is_file():
        key = _load_private(path)
        pub = _public_raw(key)
        card["signature"] = {"scheme": "ed25519", "public_key": pub.hex(), "key_id": _key_id(pub),
                             "value": key.sign(_payload(card)).hex()}
    else:
        secret = _hmac_secret(create=True)
        card["signature"] = {"scheme": "hmac-sha256", "key_id": _key_id(secret),
                             "value": hmac.new(secret, _payload(card), hashlib.sha256).hexdigest()}
    return card


def trusted_public_keys(extra: list[str | os.PathLike] = ()) -> set[str]:
    """Hex public keys trusted here: those given, this user's own, and the one of the signing key."""
    keys = set()
    for f in [*extra, key_dir() / PUBLIC_KEY]:
        p = Path(f).expanduser()
        if p.is_file():
            text = p.read_text().strip()
            if len(text) == 64:
                keys.add(text.lower())
            elif p in map(Path, extra):
                raise CardError(f"{p} is not an Ed25519 public key (64 hex digits)")
    if signing_key_path().is_file():
        keys.add(_public_raw(_load_private(signing_key_path())).hex())
    return keys


def check_signature(card: dict, public_keys: list[str | os.PathLike] = ()) -> dict:
    sig = card.get("signature")
    if not isinstance(sig, dict) or "value" not in sig:
        raise CardError(f"{CARD} is not signed")
    if sig.get("scheme") == "ed25519":
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig["public_key"]))
            pub.verify(bytes.fromhex(sig["value"]), _payload(card))
        except (InvalidSignature, ValueError, KeyError):
            raise CardError(f"{CARD} was edited after it was signed (the Ed25519 signature does "
                            f"not match)") from None
        if sig["public_key"].lower() not in trusted_public_keys(public_keys):
            raise CardError(f"{CARD} is signed by key {sig.get('key_id')}, which is not trusted here "
                            f"(pass --public-key FILE holding the signer's public key)")
    elif sig.get("scheme") == "hmac-sha256":
        secret = _hmac_secret(create=False)
        if secret is None or _key_id(secret) != sig.get("key_id"):
            raise CardError(f"{CARD} is signed with HMAC key {sig.get('key_id')}, which this machine "
                            f"does not hold (HMAC cards verify only where they were signed; "
                            f"`zenlm card keygen` sets up Ed25519)")
        expected = hmac.new(secret, _payload(card), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, str(sig["value"])):
            raise CardError(f"{CARD} was edited after it was signed (the HMAC does not match)")
    else:
        raise CardError(f"{CARD} has an unknown signature scheme {sig.get('scheme')!r}")
    return sig


# ----------------------------------------------------------------------------------------------
# writing, reading, verifying


def _version() -> str:
    from zenlm.version import version

    return version()


def build_card(folder: str | os.PathLike, *, kind: str, config: dict | None = None,
               steps: int | None = None, tokens: int | None = None, parent: str | None = None,
               data: list[str | os.PathLike] = (), privacy: dict | None = None,
               metrics: dict | None = None, lineage: dict | None = None) -> dict:
    """The unsigned card of ``folder`` as it is now (every file hashed, card.json excepted)."""
    folder = Path(folder)
    return {
        "format": FORMAT, "kind": kind, "name": folder.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "zenlm_version": _version(),
        "parent": parent_entry(parent),
        "data": [data_entry(d) for d in data],
        "config": config, "steps": steps, "tokens": tokens,
        # filled by DP training (the summary's "privacy"); null epsilon: no DP guarantee
        "privacy": {"dp": False, "epsilon": None, "delta": None, **(privacy or {})},
        "metrics": metrics, "lineage": lineage,
        "files": file_hashes(folder),
    }


def write_card(folder: str | os.PathLike, **fields) -> dict:
    """Build, sign and write ``folder/card.json``; the signed card is returned."""
    card = sign(build_card(folder, **fields))
    atomic_write_json(Path(folder) / CARD, card)
    return card


def write_run_card(run: str | os.PathLike, kind: str, config: dict, summary: dict, *,
                   parent: str | None = None, data: list = (), log=print) -> dict | None:
    """The card at the end of a training run. A run that trained is not lost to a card that
    cannot be written (an unwritable key folder): that is logged instead."""
    try:
        return write_card(run, kind=kind, config=config, steps=summary.get("step"),
                          tokens=summary.get("tokens"), parent=parent, data=list(data),
                          privacy=summary.get("privacy"), metrics=summary.get("val"))
    except (OSError, CardError) as exc:
        log(f"lineage card not written: {exc}")
        return None


def read_card(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CARD
    if not path.is_file():
        raise CardError(f"{folder} has no {CARD}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CardError(f"{path} is not valid JSON (edited or damaged)") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CardError(f"{path} is not a zenlm lineage card")
    return card


def verify_card(folder: str | os.PathLike, public_keys: list[str | os.PathLike] = ()) -> dict:
    """Check the signature, every file of ``folder``, and the data and parent still present;
    raise CardError naming the first mismatch, else return what was checked."""
    folder = Path(folder)
    card = read_card(folder)
    sig = check_signature(card, public_keys)
    recorded = card.get("files") or {}
    for rel, digest in recorded.items():
        p = folder / rel
        if not p.is_file():
            raise CardError(f"{rel} is missing from {folder} (the card records it)")
        if sha256_file(p) != digest:
            raise CardError(f"{rel} does not match the card: it changed after the card was written")
    for p in _visible(folder, exclude=(CARD,)):
        rel = p.relative_to(folder).as_posix()
        if rel not in recorded:
            raise CardError(f"{rel} is not in the card: it was added after the card was written")
    checked, absent = [], []
    for entry in card.get("data") or []:
        base = Path(entry["path"])
        for name, digest in (entry.get("files") or {}).items():
            p = base / name if base.is_dir() or base.name != name else base
            if not p.is_file():
                absent.append(str(p))
                continue
            if sha256_file(p) != digest:
                raise CardError(f"data file {p} does not match the card: the data changed or was "
                                f"swapped since training")
            checked.append(str(p))
    parent = card.get("parent") or None
    parent_state = None
    if parent and parent.get("path") and parent.get("sha256"):
        where = Path(parent["path"])
        if where.exists():
            if tree_sha256(where) != parent["sha256"]:
                raise CardError(f"parent model {where} does not match the card: it changed since "
                                f"this model was trained from it")
            parent_state = "checked"
        else:
            parent_state = "absent"
    return {"card": str(folder / CARD), "scheme": sig["scheme"], "key_id": sig.get("key_id"),
            "files": len(recorded), "data_checked": checked, "data_absent": absent,
            "parent": parent_state}


# ----------------------------------------------------------------------------------------------
# the Hugging Face model card


def _privacy_line(privacy: dict | None) -> str:
    if privacy and privacy.get("epsilon") is not None:
        delta = privacy.get("delta")
        return f"differentially private: ε = {privacy['epsilon']:.3g}" + \
            (f", δ = {delta:.3g}" if isinstance(delta, (int, float)) else "")
    return "not trained with differential privacy (no ε guarantee)"


def readme(card: dict) -> str:
    """A README.md model card (Hugging Face's front matter + the lineage) from a card."""
    lin = card.get("lineage") or {}
    parent = card.get("parent") or {}
    lines = ["---", "library_name: transformers", "tags:", "- zenlm"]
    if parent.get("model") and not Path(parent["model"]).is_absolute():
        lines.append(f"base_model: {parent['model']}")
    lines += ["---", "", f"# {card.get('name')}", "",
              f"Exported by zenlm {card.get('zenlm_version')} on {card.get('created')}. "
              f"The signed lineage is in `card.json`; check it with `zenlm card verify FOLDER`.", "",
              "## Lineage", "", "| | |", "|---|---|"]
    if parent:
        lines.append(f"| source | `{parent.get('model')}` (sha256 of its files `{parent.get('sha256')}`) |")
    if lin.get("base"):
        lines.append(f"| base model | `{lin['base'].get('model')}` (sha256 `{lin['base'].get('sha256')}`) |")
    if lin.get("kind"):
        lines.append(f"| training | {lin['kind']}, {lin.get('steps')} steps, {lin.get('tokens'):,} tokens |"
                     if isinstance(lin.get("tokens"), int) else f"| training | {lin['kind']} |")
    for d in lin.get("data") or []:
        for name, digest in (d.get("files") or {}).items():
            lines.append(f"| data | `{name}` from `{d.get('path')}` (sha256 `{digest[:16]}…`) |")
        if d.get("pii"):
            counts = ", ".join(f"{k} {v}" for k, v in (d["pii"].get("counts") or {}).items())
            lines.append(f"| PII scrubbed | {counts or 'none found'} |")
    lines.append(f"| privacy | {_privacy_line(lin.get('privacy') or card.get('privacy'))} |")
    sig = lin.get("signature") or {}
    if sig:
        lines.append(f"| source card | signed ({sig.get('scheme')}, key {sig.get('key_id')}) |")
    if lin.get("metrics"):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in lin["metrics"].items()
                          if k.startswith("val_") and isinstance(v, (int, float)))
        lines.append(f"| validation | {shown} |")
    return "\n".join(lines) + "\n"


def write_export_card(out: str | os.PathLike, *, source: str | None, kind: str = "export-hf") -> dict:
    """README.md and card.json of an export folder: the source model as parent, and the source's
    own card (data, steps, tokens, ε) carried over as its lineage. README.md is written first,
    so the card hashes it."""
    out = Path(out)
    lineage = None
    src = Path(source).expanduser() if source else None
    if src is not None and (src / CARD).is_file():
        try:
            sc = read_card(src)
        except CardError:
            sc = None
        if sc is not None:
            lineage = {k: sc.get(k) for k in ("kind", "steps", "tokens", "data", "privacy", "metrics")}
            lineage["base"] = sc.get("parent")
            lineage["signature"] = {k: v for k, v in (sc.get("signature") or {}).items() if k != "value"}
    draft = build_card(out, kind=kind, parent=source, lineage=lineage,
                       privacy=(lineage or {}).get("privacy"))
    atomic_write_text(out / "README.md", readme(draft))
    return write_card(out, kind=kind, parent=source, lineage=lineage,
                      privacy=(lineage or {}).get("privacy"))


__all__ = ["CARD", "write_card", "write_run_card", "write_export_card", "read_card", "verify_card",
           "build_card", "sign", "keygen", "tree_sha256", "file_hashes", "readme"]
