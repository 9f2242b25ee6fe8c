"""The one exception type for a user's mistake: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (missing file, unknown target, corrupt bundle, empty prompt, ...)."""


class NonFiniteError(UserError):
    """A model, its inputs or its training produced NaN or Inf: refused before anything is written."""
