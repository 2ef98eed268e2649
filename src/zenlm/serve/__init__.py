"""Serving: an OpenAI-compatible app (app.py) behind one gate (guard.py) with scoped keys
(keys.py), limits (limits.py), a tamper-evident audit log (audit.py) and a chat page (page/)."""
