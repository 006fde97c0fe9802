"""`raystudy dashboard`: a search's Optuna history in optuna-dashboard, running or finished.

A local experiment's `optuna.db` is opened in place, so a running search shows its new trials as
they end; an experiment on a storage URI is shown from a copy of its history (the mirrored journal,
raystudy.persist.optuna_history) taken when the command starts (run it again for a newer one); an Optuna
RDB URL (a search run with `--optuna-storage`) is opened as given. No Ray here.
"""

from __future__ import annotations

from pathlib import Path

from raystudy.errors import RaystudyError, require_extra
from raystudy.persist.optuna_history import open_history

RDB_SCHEMES = ("sqlite://", "postgresql", "mysql", "oracle", "mssql")


def optuna_storage_url(source: str, cache: Path) -> tuple[object, str]:
    """(Optuna storage or its URL, what it is) for an experiment folder or URI, or an RDB URL."""
    if source.startswith(RDB_SCHEMES):
        return source, f"the Optuna storage {source.split('@')[-1]}"  # no password in what is printed
    history = open_history(source, cache)
    if history is None:
        raise RaystudyError(
            f"no Optuna history in {source}: not a search experiment, or its search ran with "
            "--optuna-storage URL (pass that URL instead)"
        )
    return history


def serve(source: str, host: str, port: int, cache: Path) -> None:
    """Serve optuna-dashboard for the search's history until interrupted."""
    require_extra("optuna_dashboard", "dashboard", "raystudy dashboard")
    from optuna_dashboard import run_server

    url, what = optuna_storage_url(source, cache)
    print(f"Optuna dashboard of {what} at http://{host}:{port}/dashboard/ (Ctrl-C stops it)", flush=True)
    run_server(url, host=host, port=port)
