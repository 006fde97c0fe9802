"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class RaystudyError(Exception):
    """Bad input or missing resources that the user can fix (a path, a name, a value)."""
