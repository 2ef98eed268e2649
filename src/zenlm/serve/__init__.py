"""Serving: an OpenAI-compatible app (app.py) on the engine, behind one gate (guard.py) with
scoped keys (keys.py), limits (limits.py), a tamper-evident audit log (audit.py); a chat page (page/)."""
