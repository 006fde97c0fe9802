"""The local Ray a command starts for itself (no `--address`): on loopback only, its token private.

Ray 2.60 binds its GCS, raylet, agents and workers to the node's network address (the GCS to every
interface): a local Ray started with the defaults can be reached from the network. Its
single-machine mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, its default on macOS and Windows)
binds all of them to 127.0.0.1 instead; Ray reads the variable when it is imported, so commands
call `use_loopback()` before anything imports ray (tests/test_local_ray.py lists the sockets).
Ray 2.60 also turns token authentication on for every new local cluster and writes the token to
`~/.ray/auth_token` with the process umask (0644 by default: readable by every local user): the
folder it is written in is made the owner's only (0700) before Ray starts, and the file 0600 after.
A umask around `ray.init` would instead make every file the cluster's processes write private.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOOPBACK_MODE = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def use_loopback() -> None:
    """Ray's single-machine mode for a local Ray: set before ray is imported (an explicit setting wins)."""
    os.environ.setdefault(*LOOPBACK_MODE)


def ray_token_file() -> Path:
    """Where Ray 2.60 keeps a local cluster's token."""
    return Path.home() / ".ray" / "auth_token"


def init_local_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` for a new local cluster, on loopback, its token file 0600."""
    use_loopback()
    import ray

    folder = ray_token_file().parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # no other user can open the token, whatever mode Ray gives the file
    # A new cluster of its own: without `address`, ray.init joins any Ray it finds running on this
    # machine (/tmp/ray), someone else's study included. A driver that `ray job submit` started on a
    # cluster is told where it runs (RAY_ADDRESS) and joins that one, as Ray intends.
    kwargs.setdefault("address", None if os.environ.get("RAY_ADDRESS") else "local")
    ray.init(**kwargs)
    keep_token_private()
    address = ray.util.get_node_ip_address()
    if address != "127.0.0.1":  # ray was imported before use_loopback (an embedding program)
        print(f"raystudy: warning: the local Ray listens on {address}, not only on 127.0.0.1", file=sys.stderr)


def keep_token_private() -> None:
    token = ray_token_file()
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)
