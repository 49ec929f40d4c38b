"""Finding processes by their command line: how sandboxes find the daemons, shims and layer servers they own."""

from __future__ import annotations

import os
from pathlib import Path


def pids_matching(*needles: str, substring: bool = False) -> list[int]:
    """Pids (this process excluded) whose argv holds every needle: as whole arguments, or anywhere in the
    command line with `substring`."""
    wanted = [n.encode() for n in needles]
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if substring:
            hit = all(w in raw for w in wanted)
        else:
            argv = raw.split(b"\0")
            hit = all(w in argv for w in wanted)
        if hit:
            out.append(int(d.name))
    return out
