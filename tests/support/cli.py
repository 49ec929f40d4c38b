"""Running the real `soci` CLI from tests, and checking its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def soci(root: Path, *args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`soci --root ROOT ARGS` as a child process; never a traceback, and exit 0 unless ok=False."""
    cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", str(root), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr, r.stderr
    if ok:
        assert r.returncode == 0, f"soci {' '.join(args)} failed: {r.stderr}"
    return r


def one_error_line(r: subprocess.CompletedProcess[str], prog: str = "soci") -> str:
    """The single `PROG: error: ...` line a failed command must print; returns it."""
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]
