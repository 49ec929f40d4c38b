"""CI smoke of `soci-bench suite`: one tiny busybox workload, one run, loopback; outputs exist, numbers positive."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from soci_helper.bench import suite
from soci_helper.sandbox.images import write_image

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and tmpfs mounts need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "docker-registry", "skopeo")),
                       reason="containerd, runc, docker-registry or skopeo missing"),
    pytest.mark.skipif(not any(os.path.isfile(p) for p in ("/bin/busybox", "/usr/bin/busybox")),
                       reason="busybox-static missing"),
]


@pytest.mark.parametrize("modes", [["full"], ["full", "soci-v1"], ["full", "soci-v2-prefetch"]],
                         ids=["full", "full+soci-v1", "full+soci-v2-prefetch"])
def test_suite_smoke(modes: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     request: pytest.FixtureRequest) -> None:
    if set(modes) & set(suite.LAZY) and (why := suite.lazy_support()):
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


def test_load_order_mode_of_an_image_without_lazy_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          request: pytest.FixtureRequest) -> None:
    """busybox under the default minimum layer size has nothing to index: the recording start reads no lazy
    layer, and the mode still runs, as a plain v2 conversion."""
    if why := suite.lazy_support():
        pytest.skip(f"SOCI lazy modes: {why}")
    pytest.importorskip("matplotlib")
    state = Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(state, ignore_errors=True))
    rc = suite.main(["--workloads", "busybox", "--modes", "full,soci-v2-prefetch", "--net", "loopback", "--runs",
                     "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--state-dir",
                     str(state)])
    assert rc == 0
    assert "load order of 0 segments" in capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    row = next(r for r in doc["results"] if r["mode"] == "soci-v2-prefetch")
    assert row["errors"] == [] and row["runs"][0]["ready_s"] > 0


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


def test_span_size_option_and_units() -> None:
    p = suite.build_parser()
    assert p.parse_args(["run"]).span_size == 4 << 20
    assert p.parse_args(["--span-size", "1M", "run"]).span_size == 1 << 20
    assert p.parse_args(["run", "--span-size", "512KiB"]).span_size == 512 << 10
    assert suite.parse_size("524288") == 512 << 10
    for bad in ("0", "1G", "-1", "1.5M", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            suite.parse_size(bad)
    assert [suite.fmt_size(n) for n in (4 << 20, 512 << 10, 1000)] == ["4 MiB", "512 KiB", "1000 B"]


def test_index_info_reports_the_span_grid_and_rejects_another_span_size(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    # Incompressible, so that the gzip layer and its spans have a predictable size.
    (tree / "data.bin").write_bytes(os.urandom(600_000))
    tar = tmp_path / "layer.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(tar), "data.bin"], check=True)
    write_image(tmp_path / "layout", [tar], "v1")
    root = tmp_path / "root"
    span = 128 << 10
    created = suite.run_soci("create", "--min-layer-size", "0", "--span-size", str(span),
                             f"oci:{tmp_path / 'layout'}:v1", root=root)
    info = suite.index_info(root, created.stdout, span)
    (z,) = info.ztocs
    assert info.span_size == span and info.index_bytes > 0
    # 600 KB of data plus tar headers in 128 KiB spans.
    assert z["spans"] == 5 and z["layer_bytes"] > 600_000 and info.ztoc_bytes == z["ztoc_bytes"] > 0
    with pytest.raises(RuntimeError, match="span size"):
        suite.index_info(root, created.stdout, span * 2)
    with pytest.raises(RuntimeError, match="no index digest"):
        suite.index_info(root, "", span)
