"""Operating soci-snapshotter-grpc: socket activation, readiness, signals, metrics, config, systemd units."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soci_helper import config
from soci_helper.containerd import client
from soci_helper.fs.stats import MountStats
from soci_helper.snapshotter import metrics, systemd

pytestmark = pytest.mark.timeout(60)

pb: Any = importlib.import_module("soci_helper.containerd.api.services.snapshots.v1.snapshots_pb2")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = bytes([0, 0, 0, 0x4, 0, 0, 0, 0, 0])  # length 0, type SETTINGS, no flags, stream 0
UNITS = Path(__file__).resolve().parent.parent / "systemd"
LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64


# --- helpers -----------------------------------------------------------------------


class NotifyListener:
    """A stand-in for the service manager's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if key in m:
                    return m
            if proc.poll() is not None and not self._pending():
                raise AssertionError(f"daemon exited ({proc.returncode}) before {key}: {proc.stderr.read()}")
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def _pending(self) -> bool:
        self.sock.settimeout(0)
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, TimeoutError):
            return False
        self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        return True

    def close(self) -> None:
        self.sock.close()


def _listening_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


def _spawn(args: list[str], env: dict[str, str], listener: socket.socket | None = None) -> subprocess.Popen[str]:
    """The daemon as a service manager starts it: fd 3 and LISTEN_PID naming the daemon's own pid."""
    cmd = [sys.executable, "-m", "soci_helper.cli.daemon", *args]
    if listener is None:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    # The shell's pid is the daemon's after exec, which is how LISTEN_PID can name it in advance (bash, not
    # sh: dash cannot redirect descriptors above 9).
    fd = listener.fileno()
    script = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fd} {fd}<&-'
    return subprocess.Popen(["bash", "-c", script, "bash", *cmd], env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _env(notify: NotifyListener | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET")}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    return env


def _stop(proc: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon ignored SIGTERM: {err}") from None
    return proc.returncode, err


def _stub(address: Path) -> Any:
    ch = client.channel(str(address))
    client.wait_ready(ch, 10)
    return ch, client.snapshots_stub(ch)


def _names(stub: Any) -> list[str]:
    return sorted(i.name for resp in stub.List(pb.ListSnapshotsRequest(snapshotter="soci"), timeout=5)
                  for i in resp.info)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(tmp_path / "notify")
    yield n
    n.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- socket activation, readiness, graceful stop --------------------------------------


def test_fd_activation_ready_stop_and_restart(tmp_path: Path, notify: NotifyListener,
                                             procs: list[subprocess.Popen[str]]) -> None:
    public = tmp_path / "s.sock"
    listener = _listening_socket(public)
    args = ["--address", "fd://", "--root", str(tmp_path / "root"), "--log-level", "debug"]
    d = _spawn(args, _env(notify), listener)
    procs.append(d)

    ready = notify.wait_for("READY", d)
    assert ready["READY"] == "1" and ready["MAINPID"] == str(d.pid) and str(public) in ready["STATUS"]
    assert "STATUS" in notify.messages[0] and "READY" not in notify.messages[0]  # restoring came first
    # READY means serving: the first call after it must succeed at once.
    ch, stub = _stub(public)
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="soci", key="k1"), timeout=5)
    info = stub.Stat(pb.StatSnapshotRequest(snapshotter="soci", key="k1"), timeout=5).info
    assert info.name == "k1" and info.kind == pb.ACTIVE
    assert _names(stub) == ["k1"]
    ch.close()

    rc, err = _stop(d)
    assert rc == 0, err
    assert "STOPPING" in notify.wait_for("STOPPING", d)
    assert public.is_socket()  # the manager's socket: never unlinked by the daemon
    assert not (tmp_path / ".s.sock.grpc").exists()  # its private backend socket is gone
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(re.match(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR) \S+: ", ln) for ln in lines), err

    # Between daemons the socket keeps accepting; a client that connects now is served by the next one.
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(public))
    early.sendall(H2_PREFACE + H2_EMPTY_SETTINGS)
    d2 = _spawn(args, _env(notify), listener)
    procs.append(d2)
    early.settimeout(20)
    frame = early.recv(9)
    assert len(frame) == 9 and frame[3] == 0x4  # the new daemon's gRPC server answers with its SETTINGS
    early.close()
    ch, stub = _stub(public)
    assert _names(stub) == ["k1"]  # same root, state kept
    ch.close()
    assert _stop(d2)[0] == 0
    listener.close()


def test_fd_address_without_activation_is_one_line_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "soci_helper.cli.daemon", "--address", "fd://", "--root",
                        str(tmp_path / "root")], env=_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "socket activation" in r.stderr


def test_listen_fds_semantics() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(env) == [] and env == {}  # another process's fds, and the variables are gone
    assert systemd.listen_fds({}) == []
    with pytest.raises(systemd.ActivationError, match="socket activation"):
        systemd.unix_listener([])
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        with pytest.raises(systemd.ActivationError, match="no listening"):
            systemd.unix_listener([a.fileno()])
        assert a.fileno() >= 0  # a passed fd that is not ours to use is left open
        with pytest.raises(systemd.ActivationError, match="not a socket"):
            systemd.unix_listener([r])
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_notifier_abstract_address() -> None:
    name = f"soci-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        rx.settimeout(5)
        env = {"NOTIFY_SOCKET": "@" + name}
        n = systemd.Notifier(env)
        assert env == {} and n.enabled
        assert n.stopping("bye")
        assert rx.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=bye"]
    assert not systemd.Notifier({}).notify({"READY": 1})


def test_stale_socket_removed_and_path_socket_ready(tmp_path: Path, notify: NotifyListener,
                                                    procs: list[subprocess.Popen[str]]) -> None:
    sock = tmp_path / "run" / "snap.sock"
    sock.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # the file stays; nobody listens: what a killed daemon leaves
    assert sock.is_socket()
    d = _spawn(["--address", str(sock), "--root", str(tmp_path / "root"), "--log-level", "warn"], _env(notify))
    procs.append(d)
    notify.wait_for("READY", d)
    ch, stub = _stub(sock)
    assert _names(stub) == []
    ch.close()
    rc, err = _stop(d)
    assert rc == 0 and "STOPPING" in notify.wait_for("STOPPING", d)
    assert not sock.exists()
    assert " INFO " not in err  # --log-level warn keeps the routine lines out


# --- metrics ------------------------------------------------------------------------


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$')


def parse_exposition(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """A strict reader of the Prometheus text format: every sample of a declared family, values as floats."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        assert name in types, f"{name} sampled before its TYPE"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        assert labels not in out.setdefault(name, {}), f"duplicate sample {line!r}"
        out[name][labels] = float(m.group(4))
    return out


def _value(parsed: dict[str, dict[frozenset[tuple[str, str]], float]], name: str, **labels: str) -> float:
    return parsed[name][frozenset(labels.items())]


def _write_state(root: Path, mount_id: str, layer: str, **counts: int) -> None:
    st = MountStats()
    st.add(**counts)
    st.write_atomically(root / "mounts" / f"{mount_id}.json", id=mount_id, pid=os.getpid(), layer_digest=layer,
                        state="alive", read_errors=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint(tmp_path: Path, notify: NotifyListener, procs: list[subprocess.Popen[str]]) -> None:
    root = tmp_path / "root"
    _write_state(root, "m1", LAYER_A, bytes_served=1000, bytes_fetched=4096, spans_fetched=2, cache_hits=5,
                 cache_misses=2, verify_failures=1)
    _write_state(root, "m2", LAYER_A, bytes_served=24, bytes_fetched=0, cache_hits=1)
    _write_state(root, "m3", LAYER_B, bytes_served=7)
    port = _free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'metrics_address = "127.0.0.1:{port}"\n')
    sock = tmp_path / "s.sock"
    d = _spawn(["--address", str(sock), "--root", str(root), "--config", str(cfg)], _env(notify))
    procs.append(d)
    notify.wait_for("READY", d)
    ch, stub = _stub(sock)
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="soci", key="a"), timeout=5)
    stub.View(pb.ViewSnapshotRequest(snapshotter="soci", key="v"), timeout=5)
    ch.close()

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        parsed = parse_exposition(resp.read().decode())
    ops, served = metrics.OPERATION_COUNT, metrics.BYTES_SERVED
    # Two mounts of layer A are summed under one `layer` label.
    assert _value(parsed, served, layer=LAYER_A, operation_type="synchronous_bytes_served") == 1024
    assert _value(parsed, served, layer=LAYER_A, operation_type="synchronous_bytes_fetched") == 4096
    assert _value(parsed, served, layer=LAYER_B, operation_type="synchronous_bytes_served") == 7
    assert _value(parsed, ops, layer=LAYER_A, operation_type="synchronous_read_remote_registry_fetch_count") == 2
    assert _value(parsed, ops, layer=LAYER_A, operation_type="span_verification_failure_count") == 1
    assert _value(parsed, ops, layer=LAYER_A, operation_type="span_cache_hit_count") == 6
    assert _value(parsed, ops, layer=LAYER_A, operation_type="fuse_file_read_failure_count") == 2
    assert _value(parsed, ops, layer="", operation_type="fuse_mount_failure_count") == 0
    # The files claim "alive" but name a pid that is no layer server.
    assert _value(parsed, "soci_fs_mounts", state="dead") == 3
    assert _value(parsed, "soci_snapshotter_snapshots", kind="active") == 1
    assert _value(parsed, "soci_snapshotter_snapshots", kind="view") == 1
    assert _value(parsed, "soci_snapshotter_snapshots", kind="committed") == 0
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    assert e.value.code == 404
    assert _stop(d)[0] == 0


def test_metrics_render_daemon_counters(tmp_path: Path) -> None:
    counters = metrics.DaemonCounters()
    counters.operation("prepare", 3)
    counters.decision("remote")
    counters.decision("failed", 2)
    with pytest.raises(ValueError):
        counters.decision("sideways")
    srv = metrics.MetricsServer("127.0.0.1:0", tmp_path, counters, snapshots=lambda: {"active": 2})
    srv.start()
    try:
        with urllib.request.urlopen(srv.url, timeout=5) as resp:
            parsed = parse_exposition(resp.read().decode())
    finally:
        srv.stop()
    assert _value(parsed, "soci_snapshotter_operation_count", operation="prepare") == 3
    assert _value(parsed, "soci_snapshotter_layer_decision_count", decision="remote") == 1
    assert _value(parsed, "soci_snapshotter_layer_decision_count", decision="local") == 0
    assert _value(parsed, metrics.OPERATION_COUNT, layer="", operation_type="fuse_mount_failure_count") == 2
    assert _value(parsed, "soci_snapshotter_snapshots", kind="active") == 2


# --- config and units -----------------------------------------------------------------


def test_config_default_and_dump_round_trip(tmp_path: Path) -> None:
    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "soci_helper.cli.daemon", *args], capture_output=True, text=True,
                           timeout=30, env=_env())
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert config.parse(run("config", "default")) == config.Config()
    cfg = tmp_path / "c.toml"
    cfg.write_text('metrics_address = "127.0.0.1:9999"\n[blob]\ncheck_always = true\n'
                   '[resolver.host."docker.io"]\nmirrors = [{host = "mirror.example", insecure = true}]\n')
    dumped = run("--config", str(cfg), "config", "dump")
    assert config.parse(dumped) == config.load(cfg)
    assert config.parse(dumped).resolver.host["docker.io"].mirrors[0].host == "mirror.example"


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return exe


def test_systemd_units_verify(tmp_path: Path) -> None:
    exe = _analyze()
    units = [UNITS / "soci-snapshotter.socket", UNITS / "soci-snapshotter.service"]
    service = units[1].read_text()
    assert "Type=notify" in service and "KillMode=process" in service and "--address fd://" in service
    installed = re.search(r"^ExecStart=(\S+)", service, re.M)
    assert installed
    if not os.access(installed.group(1), os.X_OK):
        # verify insists the binary exists; check the same unit against this environment's entry point.
        entry = Path(sys.executable).parent / "soci-snapshotter-grpc"
        for u in units:
            text = u.read_text().replace(installed.group(1), str(entry))
            (tmp_path / u.name).write_text(text)
        units = [tmp_path / u.name for u in units]
    r = subprocess.run([exe, "verify", *map(str, units)], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    # verify reports parse problems on stderr but still exits 0: both must be clean.
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stdout + r.stderr


def test_systemd_socket_activate_interop(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    exe = shutil.which("systemd-socket-activate")
    if exe is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    public = tmp_path / "s.sock"
    d = subprocess.Popen([exe, "-l", str(public), sys.executable, "-m", "soci_helper.cli.daemon", "--address",
                          "fd://", "--root", str(tmp_path / "root")], env=_env(), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(d)
    deadline = time.monotonic() + 10
    while not public.is_socket():
        assert time.monotonic() < deadline and d.poll() is None, d.stderr.read() if d.stderr else ""
        time.sleep(0.05)
    # The tool execs the daemon on the first connection; that connection is then served by it.
    ch, stub = _stub(public)
    assert _names(stub) == []
    ch.close()
    rc, err = _stop(d)
    assert rc == 0, err


def test_service_feeds_the_daemon_counters(tmp_path: Path) -> None:
    from soci_helper.snapshotter.service import Snapshotter

    counters = metrics.DaemonCounters()
    sn = Snapshotter(tmp_path, counters=counters)
    try:
        sn.prepare("ns/1/a", "", {})
        sn.commit("ns/1/A", "ns/1/a", {})
        sn.prepare("ns/1/b", "ns/1/A", {"containerd.io/snapshot.ref": "sha256:" + "1" * 64})
        sn.view("ns/1/v", "ns/1/A", {})
        sn.remove("ns/1/v")
    finally:
        sn.close()
    ops, decisions = counters.snapshot()
    ops.pop("cleanup", None)  # start-up recovery sweeps orphan directories too
    assert ops == {"prepare": 2, "commit": 1, "view": 1, "remove": 1}
    assert decisions == {"remote": 0, "local": 1, "failed": 0}
