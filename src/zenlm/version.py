"""zenlm's version, on the bottom floor: the package, the CLI and lineage cards all name it,
and none of them should import the package root (or each other) to learn it."""

from __future__ import annotations

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version (what pip reports), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("zenlm")
    except PackageNotFoundError:
        return __version__
