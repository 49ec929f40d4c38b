"""The snapshotter service through a real gRPC channel: chains, mounts, filters, labels, errors, crashes."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from soci_helper.containerd import client
from soci_helper.snapshotter import filters
from soci_helper.snapshotter.metadata import Kind, MetaStore, SnapshotInvalid, Usage
from soci_helper.snapshotter.remote import LayerRequest, RemoteLayer
from soci_helper.snapshotter.service import Server, Snapshotter

pytestmark = pytest.mark.timeout(60)

# Generated at first use, so imported by name (linters cannot see the package on disk).
pb: Any = importlib.import_module("soci_helper.containerd.api.services.snapshots.v1.snapshots_pb2")

REF = "containerd.io/snapshot.ref"


class Client:
    """The calls containerd's proxy makes, with snapshots named as containerd names them."""

    def __init__(self, address: str) -> None:
        self.ch = client.channel(address)
        client.wait_ready(self.ch, 10)
        self.stub = client.snapshots_stub(self.ch)

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Any]:
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="soci", key=key, parent=parent,
                                                                labels=labels or {})).mounts)

    def view(self, key: str, parent: str = "") -> list[Any]:
        return list(self.stub.View(pb.ViewSnapshotRequest(snapshotter="soci", key=key, parent=parent)).mounts)

    def mounts(self, key: str) -> list[Any]:
        return list(self.stub.Mounts(pb.MountsRequest(snapshotter="soci", key=key)).mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(snapshotter="soci", name=name, key=key, labels=labels or {}))

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter="soci", key=key))

    def stat(self, key: str) -> Any:
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter="soci", key=key)).info

    def update(self, name: str, labels: dict[str, str], paths: list[str] | None = None) -> Any:
        req = pb.UpdateSnapshotRequest(snapshotter="soci", info=pb.Info(name=name, labels=labels))
        if paths is not None:
            req.update_mask.paths.extend(paths)
        return self.stub.Update(req).info

    def list(self, *filters: str) -> list[Any]:
        out = []
        for resp in self.stub.List(pb.ListSnapshotsRequest(snapshotter="soci", filters=list(filters))):
            out.extend(resp.info)
        return out

    def names(self, *filters: str) -> list[str]:
        return sorted(i.name for i in self.list(*filters))

    def usage(self, key: str) -> Any:
        return self.stub.Usage(pb.UsageRequest(snapshotter="soci", key=key))

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="soci"))

    def close(self) -> None:
        self.ch.close()


def code_of(call: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        call(*args, **kw)
    return ei.value.code()


class Served:
    def __init__(self, root: Path, decider: Any = None) -> None:
        self.root = root
        self.sock = str(root / "s.sock")
        self.sn = Snapshotter(root / "state", decider=decider)
        self.server = Server(self.sock, self.sn, workers=4)
        self.server.start()
        self.c = Client(self.sock)

    def stop(self) -> None:
        self.c.close()
        self.server.stop(0)

    def snapdir(self, key: str) -> Path:
        return self.sn.dir_of(self.sn.store.get(key))


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def opts(m: Any) -> dict[str, str]:
    return dict(o.split("=", 1) for o in m.options if "=" in o)


# --- chains and mounts ----------------------------------------------------


def test_prepare_commit_view_chain(srv: Served) -> None:
    c = srv.c
    (m,) = c.prepare("ns/1/extract-1 sha256:a")
    assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
    fs_a = Path(m.source)
    assert fs_a.is_dir() and fs_a.name == "fs" and (fs_a.parent / "work").is_dir()
    (fs_a / "hello").write_bytes(b"x" * 10000)
    c.commit("ns/2/sha256:a", "ns/1/extract-1 sha256:a")
    info = c.stat("ns/2/sha256:a")
    assert (info.kind, info.parent) == (pb.COMMITTED, "")
    assert code_of(c.stat, "ns/1/extract-1 sha256:a") == grpc.StatusCode.NOT_FOUND

    (m,) = c.prepare("ns/3/extract-2 sha256:b", "ns/2/sha256:a")
    assert m.type == "overlay" and m.source == "overlay"
    o = opts(m)
    assert o["lowerdir"] == str(fs_a)
    fs_b = Path(o["upperdir"])
    assert fs_b.is_dir() and Path(o["workdir"]) == fs_b.parent / "work"
    assert [list(x.options) for x in c.mounts("ns/3/extract-2 sha256:b")] == [list(m.options)]
    c.commit("ns/4/sha256:b", "ns/3/extract-2 sha256:b", labels={"l": "1"})
    assert dict(c.stat("ns/4/sha256:b").labels) == {"l": "1"}

    # A container on top: upper plus both lowers, nearest first.
    (m,) = c.prepare("ns/5/ctr", "ns/4/sha256:b")
    assert opts(m)["lowerdir"] == f"{fs_b}:{fs_a}"
    # Read-only views: lowers only for a stack, a read-only bind for one layer.
    (v,) = c.view("ns/6/view2", "ns/4/sha256:b")
    assert v.type == "overlay" and "upperdir" not in opts(v) and opts(v)["lowerdir"] == f"{fs_b}:{fs_a}"
    (v1,) = c.view("ns/7/view1", "ns/2/sha256:a")
    assert (v1.type, v1.source, list(v1.options)) == ("bind", str(fs_a), ["ro", "rbind"])
    (v0,) = c.view("ns/8/view0")
    assert (v0.type, list(v0.options)) == ("bind", ["ro", "rbind"])
    assert c.stat("ns/6/view2").kind == pb.VIEW

    assert code_of(c.mounts, "ns/2/sha256:a") == grpc.StatusCode.FAILED_PRECONDITION
    u = c.usage("ns/2/sha256:a")
    assert u.size >= 10000 and u.inodes == 1
    (Path(opts(m)["upperdir"]) / "f").write_bytes(b"y" * 20000)
    u = c.usage("ns/5/ctr")
    assert u.size >= 20000 and u.inodes == 1


def test_remove_and_cleanup(srv: Served) -> None:
    c = srv.c
    c.prepare("a-active")
    c.commit("a", "a-active")
    c.prepare("b", "a")
    da, db = srv.snapdir("a"), srv.snapdir("b")
    assert code_of(c.remove, "a") == grpc.StatusCode.FAILED_PRECONDITION
    c.remove("b")
    assert not db.exists()
    c.remove("a")
    assert not da.exists()
    assert code_of(c.remove, "a") == grpc.StatusCode.NOT_FOUND
    orphan = srv.sn.snapshots_dir / "999"
    (orphan / "fs").mkdir(parents=True)
    c.cleanup()
    assert not orphan.exists()
    assert c.list() == []


def test_error_codes(srv: Served) -> None:
    c = srv.c
    c.prepare("k")
    assert code_of(c.prepare, "k") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(c.prepare, "x", "missing") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.prepare, "x", "k") == grpc.StatusCode.INVALID_ARGUMENT  # parent not committed
    assert code_of(c.prepare, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.prepare, "big", labels={"k": "v" * 5000}) == grpc.StatusCode.INVALID_ARGUMENT
    c.view("v")
    assert code_of(c.commit, "n", "v") == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(c.commit, "n", "nope") == grpc.StatusCode.NOT_FOUND
    c.prepare("k2")
    c.commit("n", "k2")
    assert code_of(c.commit, "n", "k") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(c.commit, "n2", "n") == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(c.stat, "nope") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.usage, "nope") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.mounts, "nope") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.update, "k", {}, ["parent"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.update, "nope", {"a": "b"}) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.list, 'labels."unterminated') == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing half-made is left behind by the refusals.
    assert c.names() == ["k", "n", "v"]


# --- List filters ------------------------------------------------------------


def _commit(c: Client, name: str, parent: str = "", labels: dict[str, str] | None = None) -> None:
    c.prepare(name + "-active", parent, labels)
    c.commit(name, name + "-active", labels)


def test_list_filters(srv: Served) -> None:
    c = srv.c
    # The same layer chain unpacked in two namespaces: same chainID label, different parent keys.
    _commit(c, "ns1/1/sha256:base", labels={REF: "sha256:base"})
    _commit(c, "ns1/2/sha256:top", "ns1/1/sha256:base", {REF: "sha256:top", "containerd.io/snapshot/x": "1"})
    _commit(c, "ns2/1/sha256:base", labels={REF: "sha256:base"})
    _commit(c, "ns2/2/sha256:top", "ns2/1/sha256:base", {REF: "sha256:top"})
    c.prepare("ns1/3/ctr", "ns1/2/sha256:top", {"app": "web"})

    # containerd's remote-snapshot handshake picks the one in the right namespace by parent.
    assert c.names(f'labels."{REF}"==sha256:top,parent=="ns2/1/sha256:base"') == ["ns2/2/sha256:top"]
    assert c.names(f'labels."{REF}"=="sha256:top",parent=="ns1/1/sha256:base"') == ["ns1/2/sha256:top"]
    assert c.names(f'labels."{REF}"==sha256:top,parent=="ns3/1/sha256:base"') == []
    assert c.names(f'labels."{REF}"==sha256:base') == ["ns1/1/sha256:base", "ns2/1/sha256:base"]
    assert len(c.names()) == 5
    assert c.names("kind==active") == ["ns1/3/ctr"]
    assert c.names("kind!=committed") == ["ns1/3/ctr"]
    assert c.names('name=="ns1/3/ctr"') == ["ns1/3/ctr"]
    assert c.names("labels.app") == ["ns1/3/ctr"]
    assert c.names('labels."containerd.io/snapshot/x"') == ["ns1/2/sha256:top"]
    assert c.names("labels.app!=web") == [n for n in c.names() if n != "ns1/3/ctr"]
    assert c.names("name~=^ns2/") == ["ns2/1/sha256:base", "ns2/2/sha256:top"]
    assert c.names("name~=/top$/") == ["ns1/2/sha256:top", "ns2/2/sha256:top"]
    assert c.names('parent==""') == ["ns1/1/sha256:base", "ns2/1/sha256:base"]
    assert code_of(c.list, "parent==") == grpc.StatusCode.INVALID_ARGUMENT
    # Several filters are OR'ed.
    assert c.names("kind==active", 'name=="ns2/1/sha256:base"') == ["ns1/3/ctr", "ns2/1/sha256:base"]
    assert c.names(" kind == active ") == ["ns1/3/ctr"]


def test_filter_parser() -> None:
    (s,) = filters.parse('labels."containerd.io/snapshot.ref"==sha256:abc')
    assert s.fieldpath == ("labels", "containerd.io/snapshot.ref") and s.op == "==" and s.value == "sha256:abc"
    a, b = filters.parse('name!="a,b\\"c",labels.x.y')
    assert (a.op, a.value) == ("!=", 'a,b"c') and (b.fieldpath, b.op) == (("labels", "x", "y"), "")
    (r,) = filters.parse(r"name~=/a\/b\d/")
    assert r.value == r"a/b\d"
    (q,) = filters.parse('parent=="\\x41\\u00e9\\101"')
    assert q.value == "AéA"
    for bad in ["", ",", "name==", "name=", "labels.", '"open', "name==a b", "a,,b", "name~=/(/"]:
        if bad == "":
            assert filters.parse(bad) == []
            continue
        with pytest.raises(SnapshotInvalid):
            filters.parse(bad)


# --- labels ------------------------------------------------------------------


def test_update_label_paths(srv: Served) -> None:
    c = srv.c
    c.prepare("k", labels={"a": "1", "b": "2", "c": "3"})
    before = c.stat("k")
    time.sleep(0.01)
    info = c.update("k", {"a": "10", "b": "", "z": "ignored"}, ["labels.a", "labels.b", "labels.new"])
    assert dict(info.labels) == {"a": "10", "c": "3"}
    assert info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert info.created_at == before.created_at and info.kind == pb.ACTIVE
    assert dict(c.stat("k").labels) == {"a": "10", "c": "3"}
    assert dict(c.update("k", {"x": "1"}, ["labels"]).labels) == {"x": "1"}
    assert dict(c.update("k", {"y": "2"}).labels) == {"y": "2"}  # no mask: all mutable fields
    assert dict(c.update("k", {}, ["labels.y"]).labels) == {}


# --- the remote-layer hook ---------------------------------------------------


class FakeRemote:
    """Pretends to mount a lazy layer by writing a marker file where the layer would be mounted."""

    def __init__(self) -> None:
        self.requests: list[LayerRequest] = []
        self.released: list[Path] = []

    def prepare(self, req: LayerRequest) -> RemoteLayer | None:
        self.requests.append(req)
        if req.labels.get("containerd.io/snapshot/remote") != "yes":
            return None
        (req.mountpoint / "lazy").write_text(req.target)
        return RemoteLayer(labels={"containerd.io/snapshot/remote.mounted": "1"}, usage=Usage(123, 4))

    def release(self, mountpoint: Path) -> None:
        self.released.append(mountpoint)


def test_remote_decider_hook(tmp_path: Path) -> None:
    dec = FakeRemote()
    s = Served(tmp_path, decider=dec)
    try:
        c = s.c
        labels = {REF: "sha256:l1", "containerd.io/snapshot/remote": "yes"}
        assert code_of(c.prepare, "ns/1/extract-1 sha256:l1", "", labels) == grpc.StatusCode.ALREADY_EXISTS
        (hit,) = c.list(f'labels."{REF}"==sha256:l1,parent==""')
        assert hit.name == "sha256:l1" and hit.kind == pb.COMMITTED
        assert hit.labels["containerd.io/snapshot/remote.mounted"] == "1"
        assert c.usage("sha256:l1").size == 123
        assert (s.snapdir("sha256:l1") / "fs" / "lazy").read_text() == "sha256:l1"
        # Same chainID from another namespace with another parent: still answered, under its own name.
        _commit(c, "ns2/1/sha256:p")
        labels2 = {REF: "sha256:l1", "containerd.io/snapshot/remote": "yes"}
        assert code_of(c.prepare, "ns2/2/extract", "ns2/1/sha256:p", labels2) == grpc.StatusCode.ALREADY_EXISTS
        (hit2,) = c.list(f'labels."{REF}"==sha256:l1,parent=="ns2/1/sha256:p"')
        assert hit2.name != "sha256:l1"
        assert dec.requests[-1].parent_dirs == (s.snapdir("ns2/1/sha256:p") / "fs",)
        # Declined: an ordinary active snapshot, unpacked locally.
        (m,) = c.prepare("ns/3/extract-2", "sha256:l1", {REF: "sha256:l2"})
        assert m.type == "overlay" and c.stat("ns/3/extract-2").kind == pb.ACTIVE
        # Without a target label the decider is not asked.
        n = len(dec.requests)
        c.prepare("ns/4/ctr", "sha256:l1")
        assert len(dec.requests) == n
    finally:
        s.stop()


# --- crash safety -----------------------------------------------------------


def _consistent(root: Path) -> list[Any]:
    """Every row has its directory, no directory lacks a row, every parent exists and is committed."""
    store = MetaStore(root / "snapshotter" / "metadata.db")
    try:
        rows = store.all()
    finally:
        store.close()
    by_key = {r.key: r for r in rows}
    for r in rows:
        assert (root / "snapshotter" / "snapshots" / str(r.id) / "fs").is_dir(), r
        if r.parent:
            assert by_key[r.parent].kind == Kind.COMMITTED
    dirs = {int(d.name) for d in (root / "snapshotter" / "snapshots").iterdir()}
    assert dirs == {r.id for r in rows}
    return rows


def test_kill9_midway_and_restart(tmp_path: Path) -> None:
    from soci_helper.sandbox.containerd import SnapshotterDaemon

    root, sock = tmp_path / "root", tmp_path / "d.sock"
    d = SnapshotterDaemon(root, sock, tmp_path / "d.log", log_level="info")
    d.start()
    c = Client(str(sock))
    done: list[str] = []
    stop = threading.Event()

    def churn() -> None:
        parent = ""
        i = 0
        while not stop.is_set():
            try:
                key, name = f"ns/{i}/extract", f"ns/{i}/layer"
                c.prepare(key, parent)
                c.commit(name, key)
                c.view(f"ns/{i}/view", name)
                if i % 3 == 0:
                    c.remove(f"ns/{i}/view")
                done.append(name)
                parent, i = name, i + 1
            except grpc.RpcError:
                return

    t = threading.Thread(target=churn)
    try:
        t.start()
        deadline = time.monotonic() + 20
        while len(done) < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        d.kill9()
    finally:
        stop.set()
        t.join(10)
        c.close()
    assert len(done) >= 15, d.log_tail()
    assert sock.is_socket()  # left behind by the crash
    d.start()  # removes the stale socket, recovers the store
    try:
        rows = _consistent(root)
        keys = {r.key for r in rows}
        assert set(done) <= keys
        c = Client(str(sock))
        try:
            assert {i.name for i in c.list()} == keys
            top = done[-1]
            (m,) = c.prepare("after", top)
            assert len(opts(m)["lowerdir"].split(":")) >= len(done)
        finally:
            c.close()
    finally:
        d.stop()
    assert not sock.exists()


# --- daemon command line and stubs -----------------------------------------


def _daemon(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "soci_helper.cli.daemon", *args], capture_output=True, text=True,
                          timeout=30, **kw)


def test_daemon_config_commands(tmp_path: Path) -> None:
    import tomllib

    from soci_helper import config

    r = _daemon("config", "default")
    assert r.returncode == 0 and tomllib.loads(r.stdout)["snapshotter"]["min_layer_size"] == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text("[snapshotter]\nmin_layer_size = 5\n[pull_modes.soci_v2]\nenable = false\n")
    r = _daemon("--config", str(cfg), "config", "dump")
    assert r.returncode == 0
    dumped = config.parse(r.stdout)
    assert dumped.snapshotter.min_layer_size == 5 and dumped.pull_modes.soci_v2.enable is False
    r = _daemon("--config", str(tmp_path / "missing.toml"), "--address", str(tmp_path / "s"), "--root",
                str(tmp_path / "r"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "missing.toml" in r.stderr


def test_daemon_refuses_a_live_socket(tmp_path: Path, srv: Served) -> None:
    r = _daemon("--address", srv.sock, "--root", str(tmp_path / "other"))
    assert r.returncode != 0 and "already serving" in r.stderr
    assert srv.c.list() == []  # the running server is untouched


def test_stub_generation_cached_and_missing_protos(tmp_path: Path) -> None:
    env = dict(os.environ, SOCI_PROTO_CACHE=str(tmp_path / "cache"))
    code = "import soci_helper.containerd.api.services.leases.v1.leases_pb2_grpc as m; print(m.__file__)"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(str(tmp_path / "cache"))
    (gen,) = (tmp_path / "cache").iterdir()
    stamp = gen.stat().st_mtime_ns
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and second.stdout == first.stdout and time.monotonic() - t0 < 5
    assert gen.stat().st_mtime_ns == stamp and [p.name for p in (tmp_path / "cache").iterdir()] == [gen.name]

    env["SOCI_CONTAINERD_PROTOS"] = str(tmp_path / "nowhere")
    env["SOCI_PROTO_CACHE"] = str(tmp_path / "cache2")
    r = _daemon("--address", str(tmp_path / "s"), "--root", str(tmp_path / "r"), env=env)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "containerd API .proto files not found" in r.stderr
