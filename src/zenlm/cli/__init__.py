"""The `zenlm` command line."""
