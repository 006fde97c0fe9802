"""`raystudy dashboard`: a search's Optuna history in optuna-dashboard, running or finished.

A local experiment's `optuna.db` is opened in place, so a running search shows its new trials as
they end; an experiment on a storage URI is shown from a copy of its mirrored `optuna.db` taken
when the command starts (run it again for a newer one); an Optuna RDB URL (a search run with
`--optuna-storage`) is opened as given. No Ray here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from raystudy import storage
from raystudy.errors import RaystudyError, require_extra

RDB_SCHEMES = ("sqlite://", "postgresql", "mysql", "oracle", "mssql")


def optuna_storage_url(source: str, cache: Path) -> tuple[str, str]:
    """(Optuna storage URL, what it is) for an experiment folder or URI, or an RDB URL."""
    if source.startswith(RDB_SCHEMES):
        return source, f"the Optuna storage {source.split('@')[-1]}"  # no password in what is printed
    location = storage.join(storage.normalize(source), storage.OPTUNA_DB)
    if not storage.exists(location):
        raise RaystudyError(
            f"no Optuna history at {location}: not a search experiment, or its search ran with "
            "--optuna-storage URL (pass that URL instead)"
        )
    if not storage.is_uri(location):
        return f"sqlite:///{location}", f"{location} (live)"
    copy = cache / hashlib.sha1(location.encode()).hexdigest()[:16] / storage.OPTUNA_DB
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(storage.read_bytes(location))
    return f"sqlite:///{copy}", f"a copy of {location} taken now (run again for a newer one)"


def serve(source: str, host: str, port: int, cache: Path) -> None:
    """Serve optuna-dashboard for the search's history until interrupted."""
    require_extra("optuna_dashboard", "dashboard", "raystudy dashboard")
    from optuna_dashboard import run_server

    url, what = optuna_storage_url(source, cache)
    print(f"Optuna dashboard of {what} at http://{host}:{port}/dashboard/ (Ctrl-C stops it)", flush=True)
    run_server(url, host=host, port=port)
