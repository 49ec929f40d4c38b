"""Unix socket liveness: telling a listening daemon's socket from a stale file left by a crashed one."""

from __future__ import annotations

import socket
from pathlib import Path


def socket_accepts(path: str | Path, timeout: float = 1.0) -> bool:
    """True if something accepts connections on the unix socket `path`; a socket file alone proves nothing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        try:
            c.connect(str(path))
        except OSError:
            return False
    return True
