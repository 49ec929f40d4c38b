"""The README's demo command runs end to end on a clean state and cleans up after itself."""

from __future__ import annotations

import glob
import subprocess
import sys


def test_demo_runs_and_leaves_nothing_behind():
    before = set(glob.glob("/tmp/soci-demo-*"))
    r = subprocess.run([sys.executable, "-m", "soci_helper.demo"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-> ztoc sha256:" in r.stdout
    assert "sha256 matches the original" in r.stdout
    assert "Traceback" not in r.stderr
    assert set(glob.glob("/tmp/soci-demo-*")) == before
