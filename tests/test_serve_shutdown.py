"""SIGTERM on a real `zenlm serve` process: new requests get 503 + Retry-After, the running
stream finishes, and the process exits cleanly."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time

from helpers import ZENLM, cli_env
from serve_helpers import free_port, get, needs_smollm2


@needs_smollm2
def test_sigterm_drains(tmp_path):
    from zenlm.serve.keys import KeyStore

    key, _ = KeyStore(tmp_path).create("t", ["generate"])
    port = free_port()
    proc = subprocess.Popen([*ZENLM, "serve", "--model", "smollm2", "--state", str(tmp_path), "--port", str(port),
                             "--grace", "30"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (_up(port) and get(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {key}",
                                                         "Content-Type": "application/json"},
                     body=json.dumps({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 40,
                                      "temperature": 0, "stream": True}))
        resp = conn.getresponse()
        first = resp.readline()
        assert resp.status == 200 and first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        c2 = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c2.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        r2 = c2.getresponse()
        assert r2.status == 503 and int(r2.getheader("Retry-After")) >= 1
        assert json.loads(r2.read())["error"]["code"] == "shutting_down"
        rest = resp.read()  # the running stream runs to its end
        events = [json.loads(ln[6:]) for ln in (first + rest).split(b"\n\n") if ln.startswith(b"data: {")]
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _up(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
