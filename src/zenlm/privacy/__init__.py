"""Privacy and protection: lineage cards (card.py); DP-SGD and memorisation audits plug in here."""
