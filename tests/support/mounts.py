"""Mount fixtures for tests: every FUSE/overlay mount under a directory is removed and every layer server of a
store root is killed afterwards, whatever the test did (including failing half way)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from soci_helper.sandbox.procs import pids_matching

SERVER_MODULE = "soci_helper.fs.server"
MOUNT_HELPER = "/sbin/mount.fuse.soci"


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(base: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below `base`, deepest (and most recent) first."""
    b = os.path.realpath(base)
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split(" ")
        mp = _unescape(parts[1])
        if mp == b or mp.startswith(b + "/"):
            found.append((mp, parts[2]))
    found.reverse()
    found.sort(key=lambda m: m[0].count("/"), reverse=True)
    return found


def server_pids(root: str | os.PathLike[str]) -> list[int]:
    """Layer servers whose command line names this store root."""
    return pids_matching(SERVER_MODULE, os.fspath(os.path.abspath(root)))


def unmount_all(base: str | os.PathLike[str]) -> None:
    for _ in range(3):
        mounts = mounts_under(base)
        if not mounts:
            return
        for mp, fstype in mounts:
            cmds = [["umount", "-l", mp]] if not fstype.startswith("fuse") else [
                ["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]]
            for cmd in cmds:
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
                if (mp, fstype) not in mounts_under(base):
                    break


def kill_servers(root: str | os.PathLike[str]) -> None:
    for pid in server_pids(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while server_pids(root) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_servers_gone(root: str | os.PathLike[str], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server_pids(root):
            return True
        time.sleep(0.05)
    return not server_pids(root)


@contextmanager
def mount_guard(base: str | os.PathLike[str], *roots: str | os.PathLike[str]) -> Iterator[None]:
    """Leave no mount below `base` and no layer server of `roots` behind, even when the body raises."""
    try:
        yield
    finally:
        unmount_all(base)
        for root in roots:
            kill_servers(root)
        unmount_all(base)  # a server killed above may have left a dead mount


def have_mount_helper() -> bool:
    return os.path.exists(MOUNT_HELPER) and shutil.which("fusermount3") is not None


def mount_cmd(source: str, mountpoint: str | os.PathLike[str], options: str) -> subprocess.CompletedProcess[str]:
    """The real `mount -t fuse.soci` (mount(8) runs /sbin/mount.fuse.soci)."""
    return subprocess.run(["mount", "-t", "fuse.soci", source, os.fspath(mountpoint), "-o", options],
                          capture_output=True, text=True, timeout=120)


def soci_cli(root: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`soci --root ROOT ARGS...` in a subprocess; asserts success."""
    import sys

    cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", os.fspath(root), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"soci {' '.join(args)} failed: {r.stderr}"
    return r


def soci_mounts(root: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`soci mounts ...` through the main CLI when it has the command, else the module's own entry point."""
    import sys

    from soci_helper.cli import main as cli_main

    try:
        wired = "mounts" in cli_main.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    except (AttributeError, IndexError):
        wired = False
    if wired:
        cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", os.fspath(root), "mounts", *args]
    else:
        cmd = [sys.executable, "-m", "soci_helper.cli.mounts", "--root", os.fspath(root), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def tree(root: str | os.PathLike[str], xattrs: bool = True) -> dict[str, dict[str, object]]:
    """Every entry below `root` (relative path -> what a layer must reproduce), without following symlinks."""
    import hashlib
    import stat as st

    out: dict[str, dict[str, object]] = {}
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            rec: dict[str, object] = {"mode": s.st_mode, "uid": s.st_uid, "gid": s.st_gid, "ino": s.st_ino,
                                      "nlink": s.st_nlink, "mtime_ns": s.st_mtime_ns}
            if st.S_ISREG(s.st_mode):
                rec["size"] = s.st_size
                with open(p, "rb") as f:
                    rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
            elif st.S_ISLNK(s.st_mode):
                rec["target"] = os.readlink(p)
            elif st.S_ISCHR(s.st_mode) or st.S_ISBLK(s.st_mode):
                rec["rdev"] = (os.major(s.st_rdev), os.minor(s.st_rdev))
            if xattrs:
                try:
                    names = os.listxattr(p, follow_symlinks=False)
                except OSError:
                    names = []
                rec["xattrs"] = {n: os.getxattr(p, n, follow_symlinks=False) for n in sorted(names)}
            out[os.path.relpath(p, base)] = rec
    return out
