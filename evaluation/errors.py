"""What `densedino-eval` treats as bad input: the subcommands end with status 2 and a one-line
reason on stderr for these, not a traceback."""

from __future__ import annotations

import pickle

BAD_INPUT: tuple[type[BaseException], ...] = (
    ValueError,  # bad options, sizes, data
    FileNotFoundError,  # missing checkpoints, weights, folders
    ImportError,  # an optional dependency the option needs
    pickle.UnpicklingError,  # a checkpoint that is not a weights-only torch file
)
