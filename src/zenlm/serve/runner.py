"""Running the app under uvicorn: the bind check, and SIGTERM as a drain rather than a cut.

uvicorn's own SIGTERM closes the listening socket at once, so a client arriving during the
grace period gets a refused connection instead of an answer it can act on. Here the first
SIGTERM (or Ctrl-C) only starts the drain: new requests get 503 with Retry-After, running ones
finish within the grace period (``engine.shutdown``), and then uvicorn is told to exit. A
second signal exits at once.
"""

from __future__ import annotations

import ipaddress
import threading

from zenlm.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_bind(host: str, keys) -> None:
    """Refuse to listen beyond this machine while no key exists (nobody could get in, and a
    keyless server reachable from the network is the mistake this prevents)."""
    if not is_loopback(host) and not keys.has_keys():
        raise ConfigError(f"refusing to listen on {host}: no API key exists yet in this state folder; "
                          f"create one with `zenlm keys create` or serve on 127.0.0.1")


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **config):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_thread: threading.Thread | None = None

        def handle_exit(self, sig, frame):
            st = app.state.zenlm
            if self.drain_thread is not None or st.draining:
                return super().handle_exit(sig, frame)  # a second signal: exit now

            def drain():
                st.begin_shutdown().join()
                self.should_exit = True

            self.drain_thread = threading.Thread(target=drain, name="zenlm-sigterm", daemon=True)
            self.drain_thread.start()

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                         timeout_graceful_shutdown=int(app.state.zenlm.grace) + 5, **config)
    return DrainingServer(cfg)


__all__ = ["check_bind", "is_loopback", "make_server"]
