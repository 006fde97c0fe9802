"""A search's Optuna history: where it lives and how its durable copy grows.

A local experiment keeps an Optuna sqlite database beside it (`optuna.db`). An experiment on a
storage URI keeps an append-only Optuna journal on the driver's disk and mirrors it into the
experiment as segments: `optuna-journal/<offset>.log` holds the journal's bytes from <offset> on,
written when the journal has grown, after every write or at most every `interval` seconds
(RAYSTUDY_OPTUNA_SYNC_S, default 0: every write), and once more when the search ends. The bytes
uploaded over a whole search are the journal's size, not its size times the number of writes (the
whole-database copies they replace). A driver lost between two uploads loses at most `interval`
seconds of history: a resumed search adds the finished trials it lacks back from Ray's results
(raystudy.cluster.experiment). No Ray here.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from raystudy.errors import RaystudyError
from raystudy.persist import storage

JOURNAL_DIR = "optuna-journal"


def sync_interval() -> float:
    """Seconds between uploads (RAYSTUDY_OPTUNA_SYNC_S, read when a mirror is made). 0: after every
    write (a suggestion, a result), so a lost driver loses nothing; more: fewer, larger segments,
    and up to that much history to recover from Ray's results."""
    return float(os.environ.get("RAYSTUDY_OPTUNA_SYNC_S", "0"))


_SEGMENT = "{:015d}.log"


def journal_storage(path: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(path))


class JournalMirror:
    """Uploads what a local journal file gained since the last upload, as one new segment."""

    def __init__(self, local: str, remote: str, interval: float | None = None, uploaded: int = 0) -> None:
        self.local, self.remote = local, remote
        self.interval = sync_interval() if interval is None else interval
        self.uploaded = uploaded  # bytes of the local journal already in the experiment
        self.last_sync = 0.0

    def sync(self, force: bool = False) -> int:
        """Upload the journal's new bytes if there are any and `interval` has passed (or `force`);
        returns the bytes uploaded."""
        size = os.path.getsize(self.local) if os.path.exists(self.local) else 0
        if size <= self.uploaded or (not force and time.monotonic() - self.last_sync < self.interval):
            return 0
        with open(self.local, "rb") as f:
            f.seek(self.uploaded)
            chunk = f.read(size - self.uploaded)
        storage.write_bytes(storage.join(self.remote, _SEGMENT.format(self.uploaded)), chunk)
        self.uploaded += len(chunk)
        self.last_sync = time.monotonic()
        return len(chunk)


def fetch_journal(remote: str, local: str) -> int:
    """Rebuild a journal file from its segments (in offset order; a segment that overlaps what is
    already there adds only its new part; a gap ends it, as the journal's lines must stay in order)."""
    data = journal_bytes(remote)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    Path(local).write_bytes(data)
    return len(data)


def resume_journal(remote: str, local: str) -> int:
    """The journal to go on with on this machine; returns how many of its bytes the experiment holds.
    A local journal that extends the experiment's (this machine's driver wrote it, and its last
    writes may not be uploaded yet) is kept, its tail uploaded by the next sync; else the
    experiment's copy replaces it."""
    data = journal_bytes(remote)
    if os.path.isfile(local) and os.path.getsize(local) >= len(data):
        with open(local, "rb") as f:
            if f.read(len(data)) == data:
                return len(data)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    Path(local).write_bytes(data)
    return len(data)


def journal_bytes(remote: str) -> bytes:
    """The journal its segments in the experiment make."""
    names = [name for name in storage.list_files(remote, ".log") if _is_segment(name)]
    with ThreadPoolExecutor(16) as pool:  # one request per segment: read them at once
        segments = list(pool.map(lambda name: _read_capped(storage.join(remote, name)), names))
    data = bytearray()
    for name, segment in zip(names, segments):
        offset = int(name.split(".")[0])
        if offset > len(data):
            print(f"optuna history: segment {name} leaves a gap after byte {len(data)}; the rest is ignored")
            break
        data += segment[len(data) - offset :]
        if len(data) > HISTORY_LIMIT:
            raise RaystudyError(f"{remote}: its journal holds more than {HISTORY_LIMIT >> 20} MiB: not read")
    return bytes(data)


# A search's history from storage is untrusted: read up to this size (a 10,000-trial journal is
# tens of MiB), never whole whatever its size.
HISTORY_LIMIT = 1 << 30


def _read_capped(location: str) -> bytes:
    data = storage.read_bytes(location, max_bytes=HISTORY_LIMIT)
    if len(data) > HISTORY_LIMIT:
        raise RaystudyError(f"{location}: more than {HISTORY_LIMIT >> 20} MiB, more than a search's history holds")
    return data


def local_copy_folder(experiment: str, cache: Path | None = None) -> Path:
    """This machine's folder for a remote experiment's history."""
    root = cache or Path(os.environ.get("RAYSTUDY_CACHE", Path.home() / ".cache" / "raystudy")).expanduser() / "optuna"
    folder = root / hashlib.sha1(experiment.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def local_journal(experiment: str, cache: Path | None = None) -> str:
    """This machine's journal of a remote experiment's search."""
    return str(local_copy_folder(experiment, cache) / "journal.log")


def _is_segment(name: str) -> bool:
    """`<offset>.log` (what the experiment's folder may also hold is not a segment of its journal)."""
    stem = name[: -len(".log")]
    return name.endswith(".log") and stem.isascii() and stem.isdigit()


def uploaded_bytes(remote: str) -> int:
    """How much of the journal the experiment's segments hold."""
    segments = [e for e in storage.list_tree(remote) if _is_segment(e.path)]
    return max((int(e.path.split(".")[0]) + e.size for e in segments), default=0)


def open_history(experiment: str, cache: Path | None = None) -> tuple[object, str] | None:
    """(Optuna storage, what it is) of an experiment's search history, or None if it has none: a local
    experiment's optuna.db in place (live); a remote one's journal segments, or its optuna.db,
    copied to this machine now."""
    location = storage.normalize(experiment)
    database = storage.join(location, storage.OPTUNA_DB)
    if not storage.is_uri(location):
        return (f"sqlite:///{database}", f"{database} (live)") if os.path.isfile(database) else None
    segments = storage.join(location, JOURNAL_DIR)
    folder = local_copy_folder(location, cache)
    if storage.list_files(segments, ".log"):
        local = local_journal(location, cache)
        fetch_journal(segments, local)
        return journal_storage(local), f"a copy of {segments} taken now (run again for a newer one)"
    if storage.exists(database):
        copy = folder / storage.OPTUNA_DB
        copy.write_bytes(_read_capped(database))
        return f"sqlite:///{copy}", f"a copy of {database} taken now (run again for a newer one)"
    return None
