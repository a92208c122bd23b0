"""The ``gyoza`` command."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``gyoza`` console script."""
    raise SystemExit("gyoza: not yet implemented")
