"""What `densedino-eval` treats as bad input: the subcommands end with status 2 and a one-line
reason on stderr for these, not a traceback."""

from __future__ import annotations

import argparse
import functools
import pickle
import sys
from collections.abc import Callable

BAD_INPUT: tuple[type[BaseException], ...] = (
    ValueError,  # bad options, sizes, data
    FileNotFoundError,  # missing checkpoints, weights, folders
    ImportError,  # an optional dependency the option needs
    pickle.UnpicklingError,  # a checkpoint that is not a weights-only torch file
)

Run = Callable[[argparse.Namespace], int]


def exits_on_bad_input(prog: str) -> Callable[[Run], Run]:
    """Decorate a subcommand's entry point: :data:`BAD_INPUT` ends it with status 2 and
    ``"<prog>: error: <reason>"`` on stderr."""

    def decorate(run: Run) -> Run:
        @functools.wraps(run)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except BAD_INPUT as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                return 2

        return wrapper

    return decorate
