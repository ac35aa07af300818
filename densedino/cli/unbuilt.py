"""A clear answer from commands whose implementation has not landed yet."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def unbuilt_command(prog: str, description: str, status: str) -> argparse.ArgumentParser:
    """Parser for a command that is planned but not built: `--help` explains both."""
    return argparse.ArgumentParser(
        prog=prog,
        description=f"{description}\n\nStatus: {status}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_unbuilt(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse (so that --help works) and say plainly that the command is not built yet."""
    parser.parse_known_args(argv)
    print(f"{parser.prog}: not built yet. {parser.description}", file=sys.stderr)
    return 2
