"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class RaystudyError(Exception):
    """Bad input or missing resources that the user can fix (a path, a name, a value)."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Refuse, with the install line, a feature whose optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RaystudyError(f"{purpose} needs {module}, which is not installed: pip install 'raystudy[{extra}]'")


class OutOfGpuMemory(RaystudyError):
    """A phase of a trial that does not fit its GPU share: retrying it the same way fails the same way."""
