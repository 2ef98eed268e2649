"""Serving: an OpenAI-compatible app on the engine, behind scoped keys, limits and an audit log."""
