"""The errors a user can act on, printed as one line without a traceback (exit code 2 or 1).

`ConfigError`: a recipe problem, raised before anything runs, naming the key path.
`StageError`: a stage cannot go on (a missing column, a wrong input, a NaN loss), naming the input,
column, file or step.
"""


class ConfigError(ValueError):
    """A recipe problem, reported with the key path it concerns."""


class StageError(RuntimeError):
    """A failure the user can act on; printed without a traceback."""
