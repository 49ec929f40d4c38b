"""Daemon restarts with lazy layers: running containers keep reading; dead or gone mounts are mounted again."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_soci_decider import (
    Driver,
    Image,
    backend,
    build_image,
    consistent,
    ctr_retry,
    fstype,
    gc_all,
    layer_servers,
    mounts_below,
    pytestmark,  # noqa: F401 - the same skips and timeout apply here
    sandbox_with,
    snapdir,
    wait_for,
)
from test_soci_decider import publish as publish_image

from soci_helper.sandbox.containerd import SociSandbox
from soci_helper.sandbox.registry import LocalRegistry

BULK = str(shutil.which("ctr"))  # a real, large binary; the suite skips without it


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("socirestart")
    img = build_image(d, "rs", [BULK])
    with LocalRegistry() as reg:
        publish_image(reg, img, "test/restart", d / "store")
        yield {"dir": d, "reg": reg, "img": img}


def _pull_and_import(sb: SociSandbox, img: Image, tmp: Path) -> tuple[Driver, Path]:
    drv = Driver(sb)
    drv.pull(img)
    ctr_retry(sb, "images", "import", "--snapshotter", "soci", "--index-name", "local/rs:v1", str(img.archive(tmp)))
    big = next(i for i in backend(sb).values() if i.labels.get("containerd.io/snapshot/remote/soci.mode") == "lazy")
    mp = snapdir(sb, big)
    assert fstype(mp) == "fuse.soci"
    return drv, mp


def _exec(sb: SociSandbox, task: str, exec_id: str, script: str) -> str:
    r = sb.containerd.ctr("tasks", "exec", "--exec-id", exec_id, task, "/bin/busybox", "sh", "-c", script,
                          check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _sha_prefix(n: int) -> str:
    with open(BULK, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()



def _collect_everything(sb: Any) -> None:
    """containerd's GC removes every snapshot: no metadata, no mount and no layer server may stay behind."""
    gc_all(sb)
    assert wait_for(lambda: backend(sb) == {}), sb.snapshotter.log_tail()
    assert mounts_below(sb.snapshotter.root) == []
    assert wait_for(lambda: layer_servers(sb.snapshotter.root) == [], 10)

def test_detached_container_survives_sigkill_and_restart(world: dict[str, Any], tmp_path: Path) -> None:
    with sandbox_with(tmp_path) as sb:
        drv, mp = _pull_and_import(sb, world["img"], tmp_path)
        try:
            ctr_retry(sb, "run", "-d", "--snapshotter", "soci", "local/rs:v1", "reader", "/bin/busybox", "sleep",
                      "600")
            assert _exec(sb, "reader", "e1", "head -c 1000 /data/ctr | sha256sum") == f"{_sha_prefix(1000)}  -\n"
            servers = layer_servers(sb.snapshotter.root)
            sb.snapshotter.kill9()
            # The layer server is its own process: with the daemon gone, new spans are still fetched.
            assert layer_servers(sb.snapshotter.root) == servers
            full = hashlib.sha256(Path(BULK).read_bytes()).hexdigest()
            assert _exec(sb, "reader", "e2", "sha256sum /data/ctr") == f"{full}  /data/ctr\n"
            sb.snapshotter.start()
            assert "1 adopted, 0 re-mounted, 0 failed" in sb.snapshotter.log_tail()
            assert layer_servers(sb.snapshotter.root) == servers and fstype(mp) == "fuse.soci"
            assert _exec(sb, "reader", "e3", "cat /etc/greeting; head -c 5000000 /data/ctr | sha256sum") == \
                f"hello from a small layer\n{_sha_prefix(5_000_000)}  -\n"
            r = ctr_retry(sb, "run", "--rm", "--snapshotter", "soci", "local/rs:v1", "after", "/bin/busybox", "cat",
                          "/etc/zstd-file")
            assert r.stdout == "from the zstd layer\n"
            ctr_retry(sb, "tasks", "kill", "-s", "SIGKILL", "reader")
            wait_for(lambda: "STOPPED" in sb.containerd.ctr("tasks", "ls", check=False).stdout, 10)
            ctr_retry(sb, "tasks", "rm", "-f", "reader")
            ctr_retry(sb, "containers", "rm", "reader")
        finally:
            drv.close()
        _collect_everything(sb)


def test_dead_and_gone_mounts_are_mounted_again(world: dict[str, Any], tmp_path: Path) -> None:
    with sandbox_with(tmp_path) as sb:
        drv, mp = _pull_and_import(sb, world["img"], tmp_path)
        try:
            # Dead: the daemon stops and every layer server is killed (the mount stays, its server gone).
            sb.snapshotter.stop()
            for pid in layer_servers(sb.snapshotter.root):
                os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: layer_servers(sb.snapshotter.root) == [], 10)
            assert fstype(mp) == "fuse.soci"
            sb.snapshotter.start()
            assert "0 adopted, 1 re-mounted, 0 failed" in sb.snapshotter.log_tail()
            assert fstype(mp) == "fuse.soci" and len(layer_servers(sb.snapshotter.root)) == 1
            r = ctr_retry(sb, "run", "--rm", "--snapshotter", "soci", "local/rs:v1", "r1", "/bin/busybox", "sh",
                          "-c", "head -c 2000000 /data/ctr | sha256sum")
            assert r.stdout == f"{_sha_prefix(2_000_000)}  -\n"

            # Gone, as after a reboot: nothing mounted, no server, only our records.
            sb.snapshotter.stop()
            for pid in layer_servers(sb.snapshotter.root):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["umount", "-l", str(mp)], check=True)
            assert fstype(mp) is None
            sb.snapshotter.start()
            assert "0 adopted, 1 re-mounted, 0 failed" in sb.snapshotter.log_tail()
            r = ctr_retry(sb, "run", "--rm", "--snapshotter", "soci", "local/rs:v1", "r2", "/bin/busybox", "sh",
                          "-c", "cat /etc/greeting; head -c 100 /data/ctr | sha256sum")
            assert r.stdout == f"hello from a small layer\n{_sha_prefix(100)}  -\n"
            # The --rm containers' snapshots go with containerd's next GC; then only the image's three remain.
            assert wait_for(lambda: len(backend(sb)) == 3)
            consistent(sb)
        finally:
            drv.close()
        _collect_everything(sb)
