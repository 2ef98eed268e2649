"""What access control and the audit log add to a request: time 10,000 audit appends under each
fsync policy, and the key check (authenticate + scope + limits) a request makes.

    PYTHONPATH=src python bench/serve_access.py [--n 10000] [--out bench/results/serve_access.json]

Medians of ``--reps`` runs; the machine is shared, so read the per-call microseconds against
the 1 ms the issue allows, not as absolute truths.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_appends(n: int, fsync: str) -> dict:
    from zenlm.serve.audit import AuditLog, verify

    with tempfile.TemporaryDirectory() as d:
        log = AuditLog(Path(d) / "audit", Path(d) / "audit.key", fsync=fsync)
        per = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            log.append(key_id="0123456789ab", route="/v1/chat/completions", model="smollm2", status=200,
                       prompt_tokens=120, completion_tokens=64, latency_ms=812.5, client="127.0.0.1:51234",
                       prompt=f"a prompt of ordinary length, number {i}" * 8)
            per.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        log.close()
        t = time.perf_counter()
        ok = verify(Path(d) / "audit", Path(d) / "audit.key").ok
        verify_s = time.perf_counter() - t
    per.sort()
    return {"fsync": fsync, "n": n, "mean_us": total / n * 1e6, "p50_us": per[n // 2] * 1e6,
            "p99_us": per[int(n * 0.99)] * 1e6, "max_us": per[-1] * 1e6, "verify_s": verify_s, "verified": ok}


def time_gate(n: int) -> dict:
    from zenlm.serve.access import Gate
    from zenlm.serve.keys import KeyStore

    with tempfile.TemporaryDirectory() as d:
        store = KeyStore(d)
        key, _ = store.create("bench", "generate", rate=10**9, tokens=10**12, concurrency=64)
        gate = Gate(store)
        header = f"Bearer {key}"
        t = time.perf_counter()
        for _ in range(n):
            with gate.check(header, "generate", tokens=100)[1] as permit:
                permit.charge(100)
        total = time.perf_counter() - t
        store.close()
    return {"n": n, "check_and_charge_us": total / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    results = {"cpu": cpu_name(), "python": platform.python_version(), "appends": [], "gate": None}
    for fsync in ("never", "checkpoint", "always"):
        runs = [time_appends(args.n if fsync != "always" else max(1, args.n // 10), fsync) for _ in range(args.reps)]
        best = sorted(runs, key=lambda r: r["mean_us"])[len(runs) // 2]
        results["appends"].append(best)
        print(f"audit append fsync={fsync:10s} n={best['n']:6d}: mean {best['mean_us']:7.1f} us  "
              f"p50 {best['p50_us']:7.1f}  p99 {best['p99_us']:7.1f}  max {best['max_us']:8.1f}  "
              f"(verify {best['verify_s']:.2f} s, ok={best['verified']})")
    gate_runs = [time_gate(max(1, args.n // 5)) for _ in range(args.reps)]
    results["gate"] = {"n": gate_runs[0]["n"],
                       "check_and_charge_us": statistics.median(r["check_and_charge_us"] for r in gate_runs)}
    print(f"gate.check + permit.charge (SQLite quota update): {results['gate']['check_and_charge_us']:.1f} us")
    print(f"cpu: {results['cpu']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
