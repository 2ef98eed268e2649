"""Privacy and protection: DP-SGD on the one training loop (dp.py), canary exposure audits
(canaries.py), lineage cards (card.py), PII scrubbing."""
