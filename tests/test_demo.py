"""The README's demo: a lazy start and a full pull of one image, both correct, lazy cheaper, nothing left behind."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc, FUSE and tmpfs mounts need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "docker-registry", "skopeo")),
                       reason="containerd, runc, docker-registry or skopeo missing"),
    pytest.mark.skipif(not any(os.path.exists(f"{d}/mount.fuse.soci") for d in ("/sbin", "/usr/sbin")),
                       reason="mount.fuse.soci not installed"),
    pytest.mark.skipif(not any(os.path.isfile(p) for p in ("/bin/busybox", "/usr/bin/busybox")),
                       reason="busybox-static missing"),
]

READY = "hello from a container of the soci-helper sample image"
# `  [lazy] <sha256>  /path` lines: what the container printed, as the demo relays it.
SUM_LINE = re.compile(r"^\s+\[(lazy|full)\] ([0-9a-f]{64})  (/\S+)$", re.M)
ROW = re.compile(r"^\| (lazy \(soci\)|full pull \(overlayfs\)) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                 re.M)
BYTES = re.compile(r"\(bytes: lazy (\d+), full (\d+)\)")


def _demo_processes() -> list[str]:
    """Command lines naming a demo directory: containerd, shims, daemon, layer servers, registry."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "/soci-demo-" in cmd:
                out.append(f"{d.name}: {cmd}")
    return out


def _fuse_soci_mounts() -> set[str]:
    return {line for line in Path("/proc/self/mountinfo").read_text().splitlines() if " fuse.soci " in line}


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_demo_starts_lazily_and_fully_and_leaves_nothing_behind() -> None:
    before = set(glob.glob("/tmp/soci-demo-*"))
    fuse_before = _fuse_soci_mounts()
    assert _demo_processes() == []
    r = subprocess.run([sys.executable, "-m", "soci_helper.demo"], capture_output=True, text=True, timeout=360)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "Traceback" not in r.stderr

    # Both modes ran, and each container printed the line and the right sha256 of two files of the big layer.
    for mode in ("lazy", "full"):
        assert f"  [{mode}] {READY}" in out, out
        sums = [(h, p) for m, h, p in SUM_LINE.findall(out) if m == mode]
        assert len(sums) == 2, out
        for digest, path in sums:
            assert digest == _sha256(path), (mode, path)
    assert out.count("output correct") == 2
    assert "-> ztoc sha256:" in out
    assert "1 layer server(s) served the big layer lazily" in out

    # The summary table: both rows, positive times; the lazy start fetched less than the full pull.
    rows = {name: [float(x) for x in rest] for name, *rest in ROW.findall(out)}
    assert set(rows) == {"lazy (soci)", "full pull (overlayfs)"}, out
    for name, (pull_s, ready_s, total_s, mb) in rows.items():
        assert pull_s > 0 and ready_s > 0 and mb > 0, name
        assert abs(total_s - pull_s - ready_s) < 0.02, name
    m = BYTES.search(out)
    assert m, out
    lazy_bytes, full_bytes = int(m.group(1)), int(m.group(2))
    assert 0 < lazy_bytes < full_bytes
    # The full pull fetched at least the whole big layer; lazily only a part of it.
    assert rows["full pull (overlayfs)"][3] > 40
    assert lazy_bytes < full_bytes / 2
    assert "cleaned up:" in out

    # Nothing left: no lazy mounts, no processes of the demo, no temporary directories.
    assert _fuse_soci_mounts() <= fuse_before
    assert "/soci-demo-" not in Path("/proc/self/mountinfo").read_text()
    assert _demo_processes() == []
    assert set(glob.glob("/tmp/soci-demo-*")) == before
