"""CI smoke of `soci-bench suite`: one tiny busybox workload, one run, loopback; outputs exist, numbers positive."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from soci_helper.bench import suite

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and tmpfs mounts need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "docker-registry", "skopeo")),
                       reason="containerd, runc, docker-registry or skopeo missing"),
    pytest.mark.skipif(not any(os.path.isfile(p) for p in ("/bin/busybox", "/usr/bin/busybox")),
                       reason="busybox-static missing"),
]


@pytest.mark.parametrize("modes", [["full"], ["full", "soci-v1"]], ids=["full", "full+soci-v1"])
def test_suite_smoke(modes: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     request: pytest.FixtureRequest) -> None:
    if "soci-v1" in modes and (why := suite.lazy_support()):
        pytest.skip(f"SOCI v1 lazy mode: {why}")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    # Short: containerd's sockets live below it and unix socket paths are limited to 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(state, ignore_errors=True))
    # The busybox image is made from the machine's busybox-static: no debootstrap, no network.
    rc = suite.main(["--workloads", "busybox", "--modes", ",".join(modes), "--net", "loopback", "--runs", "1",
                     "--min-layer-size", "0", "--cache", str(tmp_path / "cache"), "--out", str(out),
                     "--state-dir", str(state)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| workload | mode |" in table
    for mode in modes:
        assert f"| busybox | {mode} |" in table
    doc = json.loads((out / "results.json").read_text())
    rows = {r["mode"]: r for r in doc["results"]}
    assert set(rows) == set(modes)
    for mode, row in rows.items():
        assert row["errors"] == [], row["errors"]
        (run,) = row["runs"]
        for key in ("pull_s", "ready_s", "total_s", "bytes_pull", "bytes_ready"):
            assert run[key] > 0, (mode, key, run)
        assert run["bytes_ready"] >= run["bytes_pull"]
        if mode in suite.LAZY:
            assert run["rss_peak"] > 0
    for png in ("ready-loopback.png", "bytes-loopback.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # Nothing of the runs may be left: no state tmpfs, no process working in it.
    assert str(state) not in Path("/proc/self/mountinfo").read_text()
    assert list(state.iterdir()) == []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(state).encode() not in argv, argv


def test_suite_options_count_before_or_after_the_action():
    from soci_helper.bench.suite import build_parser

    p = build_parser()
    before = p.parse_args(["--workloads", "busybox", "--runs", "2", "run"])
    after = p.parse_args(["run", "--workloads", "busybox", "--runs", "2"])
    assert before.workloads == after.workloads == ["busybox"] and before.runs == after.runs == 2
    assert p.parse_args(["run"]).runs == 5


def test_sigterm_mid_run_cleans_up(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    state = Path(tempfile.mkdtemp(prefix="sbs-", dir="/tmp"))
    try:
        cmd = [sys.executable, "-m", "soci_helper.bench.main", "suite", "run", "--workloads", "busybox",
               "--modes", "full", "--net", "loopback", "--runs", "3", "--min-layer-size", "0",
               "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--state-dir", str(state)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = ""
        deadline = time.monotonic() + 90
        # Wait until a run is under way: registry, containerd and a state tmpfs all exist then.
        assert p.stderr is not None
        while time.monotonic() < deadline and "[1/" not in seen:
            line = p.stderr.readline()
            if not line:
                break
            seen += line
        assert "[1/" in seen, seen
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM
        time.sleep(0.5)
        leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, "soci-bench-suite-")]
        assert leftovers == []
        assert str(state) not in Path("/proc/self/mountinfo").read_text()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _cmdline_has(pid: str, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
