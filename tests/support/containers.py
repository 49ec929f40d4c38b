"""What the containerd tests share: waiting on a condition, and a two-layer busybox image tree."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `cond` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def busybox_binary() -> str | None:
    return next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)


def busybox_trees(t: Path) -> tuple[Path, Path]:
    """Two layer roots: a static busybox with a few applet links under bin/, then etc/greeting."""
    bb = busybox_binary()
    if bb is None:
        pytest.skip("busybox-static missing")
    r1, r2 = t / "r1", t / "r2"
    (r1 / "bin").mkdir(parents=True)
    shutil.copy(bb, r1 / "bin" / "busybox")
    for applet in ("sh", "echo", "cat"):
        os.symlink("busybox", r1 / "bin" / applet)
    (r2 / "etc").mkdir(parents=True)
    (r2 / "etc" / "greeting").write_text("from the second layer\n")
    return r1, r2
