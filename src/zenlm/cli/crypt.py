"""`zenlm encrypt PATH --key-file K --out OUT` and `zenlm decrypt PATH --key-file K --out OUT`.

PATH is one file (a checkpoint, a data shard, a GGUF file) or a whole folder (a run, a prepared
data set, an export); a sealed folder shows no file names, tensor names or config. The key is a
key file (``--new-key-file`` makes one, mode 0600), a passphrase (``--passphrase`` asks for it;
scrypt) or ZENLM_KEY / ZENLM_PASSPHRASE. ``zenlm.load(OUT, key_file=K)`` and ``--key-file`` on
the commands that load models read sealed models directly.
"""

from __future__ import annotations


def _key_args(p, *, new: bool) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key-file", metavar="FILE", help="a file holding the 32-byte key (64 hex digits)")
    if new:
        g.add_argument("--new-key-file", metavar="FILE",
                       help="make a new random key in FILE (mode 0600; never overwrites) and use it")
    g.add_argument("--passphrase", action="store_true",
                   help="ask for a passphrase (scrypt) instead of a key file")


def add_parser(sub) -> None:
    e = sub.add_parser("encrypt", help="seal a file or a folder (run, data, export) with AES-256-GCM")
    e.add_argument("path", metavar="PATH", help="a file or a folder")
    e.add_argument("--out", required=True, help="the sealed file, or the sealed folder to write")
    _key_args(e, new=True)
    e.set_defaults(func=run_encrypt)
    d = sub.add_parser("decrypt", help="open a file or folder sealed by `zenlm encrypt`")
    d.add_argument("path", metavar="PATH", help="a sealed file or folder")
    d.add_argument("--out", required=True, help="where to write the plain file or folder")
    _key_args(d, new=False)
    d.set_defaults(func=run_decrypt)


def _key(args, *, confirm: bool):
    from zenlm.crypt import new_key_file, resolve_key
    from zenlm.errors import CryptError

    if getattr(args, "new_key_file", None):
        key = new_key_file(args.new_key_file)
        print(f"new key in {args.new_key_file} (keep it safe: without it the data is lost)")
        return key
    if args.passphrase:
        import getpass

        phrase = getpass.getpass("passphrase: ")
        if confirm and getpass.getpass("again: ") != phrase:
            raise CryptError("the two passphrases differ")
        return resolve_key(passphrase=phrase)
    return resolve_key(args.key_file)


def _fresh_out(out: str) -> None:
    """--out must be new: replacing a folder (or file) the user named by mistake loses it."""
    from pathlib import Path

    from zenlm.errors import CryptError

    p = Path(out)
    if p.is_file() or (p.is_dir() and any(p.iterdir())):
        raise CryptError(f"--out {out} already exists; choose a new path (or remove it first)")


def run_encrypt(args) -> int:
    from pathlib import Path

    from zenlm.crypt import encrypt_file, encrypt_folder
    from zenlm.errors import CryptError

    src = Path(args.path)
    if not src.exists():
        raise CryptError(f"not found: {src}")
    _fresh_out(args.out)
    key = _key(args, confirm=True)
    if src.is_dir():
        res = encrypt_folder(src, args.out, key)
        print(f"sealed {res['files']} files ({res['bytes']:,} bytes) of {src} into {args.out}/")
    else:
        encrypt_file(src, args.out, key)
        print(f"sealed {src} into {args.out}")
    return 0


def run_decrypt(args) -> int:
    from pathlib import Path

    from zenlm.crypt import decrypt_file, decrypt_folder, is_sealed_folder

    src = Path(args.path)
    _fresh_out(args.out)
    key = _key(args, confirm=False)
    if src.is_dir() or is_sealed_folder(src):
        res = decrypt_folder(src, args.out, key)
        print(f"opened {res['files']} files into {args.out}/")
    else:
        decrypt_file(src, args.out, key)
        print(f"opened {src} into {args.out}")
    return 0
