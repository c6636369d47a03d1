"""Who holds a lease or a claim in the database: a process, named ``host:pid:nonce``, and whether it
is gone (a claim of a process of this host that no longer exists need not wait for its expiry)."""

from __future__ import annotations

import os
import socket
import uuid

HOST = socket.gethostname()


def new_owner() -> str:
    """A name for this process's leases and claims, unique across restarts."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_gone(owner: str, own_pid_gone: bool) -> bool:
    """Whether the process named ``owner`` is known to be gone: only a process of this host can be
    checked; a name with this process's pid is from an earlier process when ``own_pid_gone``."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOST or not pid_text.isdigit():
        return False  # another machine's process: only the expiry tells
    pid = int(pid_text)
    if pid == os.getpid():
        return own_pid_gone
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
