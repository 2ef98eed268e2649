"""Seal and unseal throughput of zenlm.crypt (chunked AES-256-GCM) against plain copying.

    python bench/crypt_throughput.py [--mib 256]

Files go through the streaming paths (encrypt_file / decrypt_file: 1 MiB reads, 64 KiB chunks);
the ratio to a plain copy of the same file says what sealing a checkpoint costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from zenlm import crypt


def timed(fn, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    key = crypt.Key(raw=os.urandom(32))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "plain.bin"
        with open(src, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        t_copy = timed(lambda: shutil.copyfile(src, tmp / "copy.bin"))
        t_seal = timed(lambda: crypt.encrypt_file(src, tmp / "sealed.zenc", key))
        t_open = timed(lambda: crypt.decrypt_file(tmp / "sealed.zenc", tmp / "back.bin", key))
        t_kdf = timed(lambda: crypt.Key(passphrase="x").master_for(crypt.KDF_SCRYPT, *crypt.SCRYPT,
                                                                   bytes(16), "bench"))
    cpu = platform.processor() or platform.machine()
    print(f"{args.mib} MiB on {cpu}: copy {args.mib / t_copy:,.0f} MiB/s, seal "
          f"{args.mib / t_seal:,.0f} MiB/s ({t_seal / t_copy:.1f}x copy), unseal "
          f"{args.mib / t_open:,.0f} MiB/s ({t_open / t_copy:.1f}x copy); scrypt "
          f"n=2^{crypt.SCRYPT[0]} r={crypt.SCRYPT[1]} p={crypt.SCRYPT[2]}: {t_kdf * 1000:.0f} ms")


if __name__ == "__main__":
    main()
