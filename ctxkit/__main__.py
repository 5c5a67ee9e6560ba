"""Command line: ``python -m ctxkit demo`` runs the showcase of what ctxkit does."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command named in ``argv`` (only ``demo`` exists) and return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        from ._demo import run_demo

        run_demo()
        return 0
    print("usage: python -m ctxkit demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
