"""A throw-away containerd (own root, state and socket; CRI off; proxy snapshotter `soci`) and our daemon.

Both always stop and leave nothing behind: tasks are killed, shims of this containerd are killed,
runc state of the sandbox's namespace is deleted, mounts under the sandbox are unmounted and its
directory is removed, even when starting fails half way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..snapshotter.sockets import socket_accepts
from .procs import pids_matching

START_TIMEOUT = 30.0
# Where containerd's runc shim keeps runc state: per namespace, shared by every containerd on the host.
RUNC_ROOT = "/run/containerd/runc"


class SandboxError(RuntimeError):
    """A sandbox service could not be started or did not become ready."""


def _mountpoints_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    out = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 4:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
            if mp.startswith(prefix):
                out.append(mp)
    return sorted(set(out), key=len, reverse=True)


def unmount_all_under(path: Path) -> None:
    """Lazily unmount every mount below `path`, deepest first (containers' rootfs, overlay, FUSE)."""
    for _ in range(3):
        mps = _mountpoints_under(path)
        if not mps:
            return
        for mp in mps:
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)


def _kill_pid(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _stop_process(p: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if p is None or p.poll() is not None:
        return
    with suppress(ProcessLookupError):
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            p.kill()
        p.wait(timeout=10)


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SandboxError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        if path.is_socket() and socket_accepts(path):
            return
        time.sleep(0.05)
    raise SandboxError(f"{what} did not create {path} within {START_TIMEOUT}s: {_tail(log)}")


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class SnapshotterDaemon:
    """`soci-snapshotter-grpc` (this interpreter, this package) on its own root and socket."""

    def __init__(self, root: Path, address: Path, log: Path, config: Path | None = None,
                 log_level: str = "debug") -> None:
        self.root, self.address, self.log, self.config = root, address, log, config
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "soci_helper.cli.daemon", "--address", str(self.address),
               "--root", str(self.root), "--log-level", self.log_level]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        env = dict(os.environ)
        # The daemon must import this very package, wherever the caller runs from.
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        _wait_socket(self.address, self.proc, self.log, "soci-snapshotter-grpc")

    def stop(self) -> None:
        _stop_process(self.proc)
        self.proc = None

    def kill9(self) -> None:
        """Crash it: no chance to clean up (the socket stays behind)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        return _tail(self.log)


class LocalContainerd:
    """containerd 1.6 with root, state and sockets in `dir`, CRI disabled, proxy snapshotter `soci`."""

    def __init__(self, dir: Path, snapshotter_address: Path | None, namespace: str | None = None) -> None:
        self.dir = dir
        self.root, self.state = dir / "root", dir / "state"
        self.address = dir / "containerd.sock"
        self.config = dir / "containerd.toml"
        self.log = dir / "containerd.log"
        self.snapshotter_address = snapshotter_address
        # A namespace of our own keeps runc state (shared by every containerd on the host) apart.
        self.namespace = namespace or f"soci-test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config_text(self) -> str:
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  level = "info"',
            "[metrics]",
            '  address = ""',
        ]
        if self.snapshotter_address is not None:
            lines += ["[proxy_plugins.soci]", '  type = "snapshot"', f'  address = "{self.snapshotter_address}"']
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.config.write_text(self._config_text())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_socket(self.address, self.proc, self.log, "containerd")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise SandboxError(f"containerd not answering on {self.address}: {_tail(self.log)}")

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """`ctr -a SOCK -n NS ARGS...`; on failure (check) raises with ctr's stderr."""
        cmd = ["ctr", "-a", str(self.address), "-n", namespace or self.namespace, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise SandboxError(f"{' '.join(args[:3])} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r

    def _remove_tasks(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        ns = self.ctr("namespaces", "ls", "-q", check=False, timeout=20).stdout.split()
        for n in ns:
            for task in self.ctr("tasks", "ls", "-q", check=False, timeout=20, namespace=n).stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, timeout=20, namespace=n)
                self.ctr("tasks", "rm", "-f", task, check=False, timeout=20, namespace=n)
            for c in self.ctr("containers", "ls", "-q", check=False, timeout=20, namespace=n).stdout.split():
                self.ctr("containers", "rm", c, check=False, timeout=20, namespace=n)

    def stop(self) -> None:
        """Stop containerd and everything it started; safe to call more than once."""
        try:
            self._remove_tasks()
        except (subprocess.TimeoutExpired, OSError):
            pass
        _stop_process(self.proc)
        self.proc = None
        # Shims outlive containerd by design; ours name our socket in their argv.
        for pid in pids_matching(str(self.address)):
            _kill_pid(pid)
        runc_ns = Path(RUNC_ROOT) / self.namespace
        if runc_ns.is_dir():
            for c in runc_ns.iterdir():
                subprocess.run(["runc", "--root", str(runc_ns), "delete", "-f", c.name],
                               capture_output=True, timeout=30)
            shutil.rmtree(runc_ns, ignore_errors=True)

    def log_tail(self) -> str:
        return _tail(self.log)


class SociSandbox:
    """Our snapshotter daemon, then containerd pointing at it, in one temporary directory."""

    def __init__(self, workdir: str | Path | None = None, config: Path | None = None,
                 run_daemon: bool = True) -> None:
        """run_daemon=False: the caller serves the snapshotter itself (in-process) on `snapshotter.address`
        and must do so before `start()`."""
        self._own = workdir is None
        # Short: unix socket paths are limited to 108 bytes.
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="soci-ctrd-"))
        self.run_daemon = run_daemon
        self.snapshotter = SnapshotterDaemon(self.dir / "soci-root", self.dir / "soci.sock",
                                             self.dir / "soci.log", config=config)
        self.containerd = LocalContainerd(self.dir / "ctrd", self.snapshotter.address)

    def start(self) -> None:
        try:
            self.containerd.dir.mkdir(parents=True, exist_ok=True)
            # containerd dials the proxy at start-up and backs off when it is missing: start ours first.
            if self.run_daemon:
                self.snapshotter.start()
            self.containerd.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            try:
                self.snapshotter.stop()
            finally:
                unmount_all_under(self.dir)
                if self._own:
                    shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SociSandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def soci_sandbox(**kw: object) -> Iterator[SociSandbox]:
    sb = SociSandbox(**kw)  # type: ignore[arg-type]
    sb.start()
    try:
        yield sb
    finally:
        sb.stop()
