"""The SOCI decider end to end: real containerd + runc + our daemon, images with a lazy layer and local ones."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.containers import wait_for

from soci_helper.bench.e2e import layer_servers
from soci_helper.containerd import client
from soci_helper.fs import server as srv
from soci_helper.sandbox.containerd import SociSandbox
from soci_helper.sandbox.images import tar_of, write_image
from soci_helper.sandbox.procs import pids_matching
from soci_helper.sandbox.registry import LocalRegistry

pytestmark = [
    pytest.mark.timeout(115),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and FUSE need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "docker-registry", "zstd",
                                                         "pigz", "fusermount3")),
                       reason="containerd, runc, docker-registry, zstd, pigz or fuse3 missing"),
    # mount(8) runs helpers from the system directories only.
    pytest.mark.skipif(not any(os.path.exists(f"{d}/mount.fuse.soci") for d in ("/sbin", "/usr/sbin")),
                       reason="mount.fuse.soci not installed"),
]

pb: Any = importlib.import_module("soci_helper.containerd.api.services.snapshots.v1.snapshots_pb2")
leases_pb: Any = importlib.import_module("soci_helper.containerd.api.services.leases.v1.leases_pb2")

SPAN = 1 << 19
MIN_LAYER = 1 << 20
SERVER_MODULE = b"soci_helper.fs.server"
DAEMON_CONFIG = f"""
[snapshotter]
min_layer_size = {MIN_LAYER}
[background_fetch]
disable = true
[http]
MaxRetries = 1
MinWaitMsec = 10
MaxWaitMsec = 100
DialTimeoutMsec = 1000
"""
REF_LABEL = "containerd.io/snapshot.ref"


def soci(root: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "soci_helper.cli.main", "--root", str(root), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"soci {' '.join(args)}: {r.stderr}"
    return r.stdout


@dataclass
class Image:
    layout: Path
    ref: str = ""
    manifest_digest: str = ""
    layers: list[dict[str, Any]] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    index_digest: str | None = None

    @property
    def chain_ids(self) -> list[str]:
        out: list[str] = []
        for d in self.diff_ids:
            out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
        return out

    def load(self) -> None:
        idx = json.loads((self.layout / "index.json").read_text())
        self.manifest_digest = idx["manifests"][0]["digest"]
        man = json.loads(self._blob(self.manifest_digest))
        self.layers = man["layers"]
        self.diff_ids = json.loads(self._blob(man["config"]["digest"]))["rootfs"]["diff_ids"]

    def _blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()

    def archive(self, where: Path) -> Path:
        out = where / f"{self.layout.name}.tar"
        if not out.exists():
            subprocess.run(["tar", "-C", str(self.layout), "-cf", str(out), "."], check=True)
        return out


def build_image(d: Path, name: str, bulk: list[str]) -> Image:
    """Layer 0 (big, gets a zTOC): busybox and real binaries; layer 1 (small gzip): a file and a whiteout of
    layer 0; layer 2 (small zstd): a file, a symlink and an opaque directory."""
    bb = shutil.which("busybox")
    if bb is None:
        pytest.skip("busybox-static missing")
    r0, r1, r2 = d / f"{name}-r0", d / f"{name}-r1", d / f"{name}-r2"
    (r0 / "bin").mkdir(parents=True)
    (r0 / "data" / "opq").mkdir(parents=True)
    (r0 / "etc").mkdir()
    shutil.copy(bb, r0 / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "head", "sha256sum", "ls", "sleep", "test"):
        os.symlink("busybox", r0 / "bin" / applet)
    for src in bulk:
        shutil.copy(src, r0 / "data" / Path(src).name)
    (r0 / "data" / "removed-me").write_text("you should not see me\n")
    (r0 / "data" / "opq" / "old").write_text("hidden by the opaque dir\n")
    (r1 / "etc").mkdir(parents=True)
    (r1 / "data").mkdir()
    (r1 / "etc" / "greeting").write_text("hello from a small layer\n")
    (r1 / "data" / ".wh.removed-me").write_text("")
    (r2 / "etc").mkdir(parents=True)
    (r2 / "data" / "opq").mkdir(parents=True)
    (r2 / "etc" / "zstd-file").write_text("from the zstd layer\n")
    os.symlink("zstd-file", r2 / "etc" / "zlink")
    (r2 / "data" / "opq" / ".wh..wh..opq").write_text("")
    (r2 / "data" / "opq" / "new").write_text("new\n")
    os.chmod(r2 / "etc" / "zstd-file", 0o640)
    t0 = tar_of(d / f"{name}-0.tar", str(r0), ["bin", "data", "etc"])
    t1 = tar_of(d / f"{name}-1.tar", str(r1), ["data", "etc"])
    t2 = tar_of(d / f"{name}-2.tar", str(r2), ["data", "etc"])
    img = Image(d / name)
    write_image(img.layout, [(t0, "pigz"), (t1, "gzip"), (t2, "zstd")], "v1")
    img.load()
    return img


def publish(reg: LocalRegistry, img: Image, repo: str, store: Path | None) -> None:
    """Push the image; with a store, build its SOCI index there (`soci create`) and push it too."""
    img.ref = reg.push_oci_layout(img.layout, f"{repo}:v1", tag="v1")
    if store is not None:
        soci(store, "create", "--plain-http", "--span-size", str(SPAN), "--min-layer-size", str(MIN_LAYER), img.ref)
        soci(store, "push", "--plain-http", img.ref)
        img.index_digest = soci(store, "index", "list", "-q").split()[0]


def daemon_config(d: Path) -> Path:
    p = d / "soci-config.toml"
    p.write_text(DAEMON_CONFIG)
    return p


def layer_labels(img: Image, i: int, explicit: bool = False) -> dict[str, str]:
    """The labels rpull puts on the Prepare of layer i."""
    out = {
        REF_LABEL: img.chain_ids[i],
        "containerd.io/snapshot/cri.image-ref": img.ref,
        "containerd.io/snapshot/cri.layer-digest": img.layers[i]["digest"],
        "containerd.io/snapshot/cri.manifest-digest": img.manifest_digest,
        "containerd.io/snapshot/cri.image-layers": ",".join(x["digest"] for x in img.layers[i:]),
    }
    if explicit and img.index_digest:
        out["containerd.io/snapshot/remote/soci.index.digest"] = img.index_digest
    return out


@dataclass
class Driver:
    """Prepare with an image's labels through containerd's snapshots API, under a lease (what rpull does)."""

    sb: SociSandbox
    lease: str = "soci-test"

    def __post_init__(self) -> None:
        self.ch = client.channel(str(self.sb.containerd.address))
        self.stub = client.snapshots_stub(self.ch)
        md = client.namespace_metadata(self.sb.containerd.namespace)
        _retry(lambda: client.leases_stub(self.ch).Create(leases_pb.CreateRequest(id=self.lease), metadata=md))
        self.md = client.namespace_metadata(self.sb.containerd.namespace, lease=self.lease)

    def close(self) -> None:
        self.ch.close()
        self.sb.containerd.ctr("leases", "delete", "--sync", self.lease, check=False)
        assert self.lease not in self.sb.containerd.ctr("leases", "ls", "-q", check=False).stdout.split()

    def labels(self, img: Image, i: int, explicit: bool = False) -> dict[str, str]:
        return layer_labels(img, i, explicit)

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> Any:
        req = pb.PrepareSnapshotRequest(snapshotter="soci", key=key, parent=parent, labels=labels)
        return self.stub.Prepare(req, metadata=self.md)

    def code(self, key: str, parent: str, labels: dict[str, str]) -> grpc.StatusCode:
        try:
            self.prepare(key, parent, labels)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    def pull(self, img: Image, explicit: bool = False) -> None:
        """Every layer answered ALREADY_EXISTS: lazily mounted or unpacked by the snapshotter."""
        chains = img.chain_ids
        for i, chain in enumerate(chains):
            code = self.code(f"extract-{i} {chain}", chains[i - 1] if i else "", self.labels(img, i, explicit))
            assert code == grpc.StatusCode.ALREADY_EXISTS, (i, code, self.sb.snapshotter.log_tail())


def _retry(fn: Callable[[], Any], tries: int = 20) -> Any:
    # containerd's proxy connection may need a moment (back-off) after our daemon (re)started.
    for i in range(tries):
        try:
            return fn()
        except grpc.RpcError:
            if i == tries - 1:
                raise
            time.sleep(0.25)
    return None


def backend(sb: SociSandbox) -> dict[str, Any]:
    ch = client.channel(str(sb.snapshotter.address))
    try:
        return {i.name: i for r in client.snapshots_stub(ch).List(pb.ListSnapshotsRequest()) for i in r.info}
    finally:
        ch.close()


def snapdir(sb: SociSandbox, info: Any) -> Path:
    """The fs directory of a backend snapshot (its id is the directory name; found through the mountpoint table)."""
    import sqlite3

    db = sqlite3.connect(str(sb.snapshotter.root / "snapshotter" / "metadata.db"))
    try:
        (sid,) = db.execute("SELECT id FROM snapshots WHERE key = ?", (info.name,)).fetchone()
    finally:
        db.close()
    return sb.snapshotter.root / "snapshotter" / "snapshots" / str(sid) / "fs"


def fstype(path: Path) -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(path):
            return right.split()[0]
    return None


def mounts_below(path: Path) -> list[str]:
    p = str(path.resolve())
    return [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if ln.split()[4].startswith(p + "/")]


def consistent(sb: SociSandbox) -> dict[str, Any]:
    """Every backend row has its directory and no directory lacks a row; nothing is mounted but lazy layers."""
    rows = backend(sb)
    snaps = sb.snapshotter.root / "snapshotter" / "snapshots"
    dirs = {d.name for d in snaps.iterdir()}
    assert dirs == {snapdir(sb, i).parent.name for i in rows.values()}
    lazy = {str(snapdir(sb, i)) for i in rows.values()
            if i.labels.get("containerd.io/snapshot/remote/soci.mode") == "lazy"}
    assert set(mounts_below(snaps)) == lazy
    return rows


def gc_all(sb: SociSandbox) -> None:
    """Remove every image (an import also keeps the layout's own name) and let containerd's GC run."""
    names = sb.containerd.ctr("images", "ls", "-q").stdout.split()
    if names:
        ctr_retry(sb, "images", "rm", "--sync", *names)
    sb.containerd.ctr("content", "prune", "references", check=False)


def ctr_retry(sb: SociSandbox, *args: str) -> subprocess.CompletedProcess[str]:
    for i in range(10):
        r = sb.containerd.ctr(*args, check=False)
        if r.returncode == 0 or i == 9:
            assert r.returncode == 0, f"ctr {' '.join(args[:3])}: {r.stderr}\n{sb.snapshotter.log_tail()}"
            return r
        time.sleep(0.5)
    raise AssertionError("unreachable")


@contextmanager
def sandbox_with(d: Path) -> Iterator[SociSandbox]:
    """Our daemon (with the test config) and containerd; afterwards nothing of either may be left."""
    sb = SociSandbox(config=daemon_config(d))
    root = sb.snapshotter.root
    try:
        sb.start()
        yield sb
    finally:
        address, sdir = str(sb.containerd.address), sb.dir
        sb.stop()
        for pid in layer_servers(root):  # only ever ours: their argv names this sandbox's root
            os.kill(pid, 9)
        assert pids_matching(address) == []
        assert not sdir.exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("socidecider")
    mixed = build_image(d, "mixed", [str(shutil.which("containerd")), str(shutil.which("ctr"))])
    plain = build_image(d, "plain", [])
    with LocalRegistry() as reg:
        publish(reg, mixed, "test/mixed", d / "store")
        publish(reg, plain, "test/plain", None)
        yield {"dir": d, "reg": reg, "mixed": mixed, "plain": plain}


def _image_blob_bytes(reg: LocalRegistry, img: Image) -> int:
    return sum(reg.bytes_served(layer["digest"]) for layer in img.layers)


def test_mixed_image_lazy_and_local_run_and_gc(world: dict[str, Any], tmp_path: Path) -> None:
    img: Image = world["mixed"]
    reg: LocalRegistry = world["reg"]
    before = _image_blob_bytes(reg, img)
    with sandbox_with(tmp_path) as sb:
        drv = Driver(sb)
        try:
            drv.pull(img, explicit=True)
            rows = consistent(sb)
            by_chain = {i.labels[REF_LABEL]: i for i in rows.values()}
            big, small, zst = (by_chain[c] for c in img.chain_ids)
            # The big layer is a FUSE mount served by a layer server; the small ones are plain directories.
            assert fstype(snapdir(sb, big)) == "fuse.soci"
            assert big.labels["containerd.io/snapshot/remote/soci.mode"] == "lazy"
            assert layer_servers(sb.snapshotter.root)
            for s in (small, zst):
                assert s.labels["containerd.io/snapshot/remote/soci.mode"] == "local"
                assert fstype(snapdir(sb, s)) is None
            fs1, fs2 = snapdir(sb, small), snapdir(sb, zst)
            assert (fs1 / "etc/greeting").read_text() == "hello from a small layer\n"
            wo = os.lstat(fs1 / "data/removed-me")
            assert stat.S_ISCHR(wo.st_mode) and wo.st_rdev == 0
            assert (fs2 / "etc/zstd-file").read_text() == "from the zstd layer\n"
            assert stat.S_IMODE((fs2 / "etc/zstd-file").stat().st_mode) == 0o640
            assert os.readlink(fs2 / "etc/zlink") == "zstd-file"
            assert os.getxattr(fs2 / "data/opq", "trusted.overlay.opaque") == b"y"

            ctr_retry(sb, "images", "import", "--snapshotter", "soci", "--index-name", "local/mixed:v1",
                      str(img.archive(tmp_path)))
            assert len(backend(sb)) == 3  # the import found every layer already there
            r = ctr_retry(sb, "run", "--rm", "--snapshotter", "soci", "local/mixed:v1", "mixed-run",
                          "/bin/busybox", "sh", "-c",
                          "cat /etc/greeting /etc/zstd-file; head -c 4 /data/ctr | sha256sum; "
                          "test -e /data/removed-me || echo whiteout-ok; ls /data/opq")
            want_head = hashlib.sha256(Path(str(shutil.which("ctr"))).read_bytes()[:4]).hexdigest()
            assert r.stdout.split("\n") == ["hello from a small layer", "from the zstd layer",
                                            f"{want_head}  -", "whiteout-ok", "new", ""]
            total = sum(layer["size"] for layer in img.layers)
            served = _image_blob_bytes(reg, img) - before
            assert served <= total // 10, f"registry served {served} of {total} image bytes"
        finally:
            drv.close()
        # GC: the image goes, the lease went with drv.close(); containerd removes every snapshot.
        gc_all(sb)
        assert wait_for(lambda: backend(sb) == {}), sb.snapshotter.log_tail()
        snaps = sb.snapshotter.root / "snapshotter" / "snapshots"
        assert list(snaps.iterdir()) == []
        assert mounts_below(sb.snapshotter.root) == []
        assert wait_for(lambda: layer_servers(sb.snapshotter.root) == [], 10)
        assert list((sb.snapshotter.root / "mounts").glob("*.json")) == []


def test_image_without_index_is_left_to_containerd(world: dict[str, Any], tmp_path: Path) -> None:
    img: Image = world["plain"]
    with sandbox_with(tmp_path) as sb:
        drv = Driver(sb)
        try:
            chain = img.chain_ids[0]
            resp = drv.prepare(f"extract-0 {chain}", "", drv.labels(img, 0))
            # An ordinary active snapshot for containerd to apply the layer into.
            assert [m.type for m in resp.mounts] == ["bind"]
            (row,) = consistent(sb).values()
            assert row.kind == pb.ACTIVE
            assert layer_servers(sb.snapshotter.root) == []
        finally:
            drv.close()


def test_bad_requests_and_registry_outage_leave_consistent_metadata(world: dict[str, Any], tmp_path: Path) -> None:
    img: Image = world["mixed"]
    c0, c1 = img.chain_ids[0], img.chain_ids[1]
    with sandbox_with(tmp_path) as sb:
        drv = Driver(sb)
        try:
            bad = {**drv.labels(img, 0), "containerd.io/snapshot/cri.layer-digest": "sha256:nothex"}
            assert drv.code(f"e-bad {c0}", "", bad) == grpc.StatusCode.INVALID_ARGUMENT
            half = {REF_LABEL: c0, "containerd.io/snapshot/cri.layer-digest": img.layers[0]["digest"]}
            assert drv.code(f"e-half {c0}", "", half) == grpc.StatusCode.INVALID_ARGUMENT
            # Labels that lie: layer 1's digest for layer 0's chainID.
            lie = {**drv.labels(img, 0), "containerd.io/snapshot/cri.layer-digest": img.layers[1]["digest"]}
            assert drv.code(f"e-lie {c0}", "", lie) == grpc.StatusCode.INVALID_ARGUMENT
            assert drv.code(f"e-orphan {c1}", "sha256:" + "0" * 64, drv.labels(img, 1)) == grpc.StatusCode.NOT_FOUND
            assert backend(sb) == {}
            drv.prepare("plain-key", "", {})
            assert drv.code("plain-key", "", {}) == grpc.StatusCode.ALREADY_EXISTS
            assert list(consistent(sb)) and layer_servers(sb.snapshotter.root) == []

            # A registry that goes away: its image is unknown to this daemon, so Prepare needs the registry.
            with LocalRegistry() as reg2:
                other = Image(img.layout)
                other.load()
                other.ref = reg2.push_oci_layout(img.layout, "test/gone:v1", tag="v1")
                reg2.stop()
                t = time.monotonic()
                code = drv.code(f"e-outage {c0}", "", drv.labels(other, 0))
                assert code == grpc.StatusCode.UNAVAILABLE, sb.snapshotter.log_tail()
                assert time.monotonic() - t < 30
            rows = consistent(sb)
            assert [r.name.rsplit("/", 1)[-1] for r in rows.values()] == ["plain-key"]
            assert mounts_below(sb.snapshotter.root) == [] and layer_servers(sb.snapshotter.root) == []
        finally:
            drv.close()


def test_rpull_then_run(world: dict[str, Any], tmp_path: Path) -> None:
    """The same image pulled by `soci image rpull`: lazy big layer, local small ones, and a container runs."""
    img: Image = world["mixed"]
    reg: LocalRegistry = world["reg"]
    with sandbox_with(tmp_path) as sb:
        c = sb.containerd
        before = len(reg.access_log())
        r = subprocess.run([sys.executable, "-m", "soci_helper.cli.main", "--root", str(sb.snapshotter.root),
                            "-a", str(c.address), "-n", c.namespace, "image", "rpull", "--plain-http", img.ref],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr + sb.snapshotter.log_tail()
        # rpull and the snapshotter each read the manifest (by tag: the snapshotter looked the image up on
        # rpull's hint, and its three Prepares found it remembered) and the config once; discovery reads the
        # index and its zTOC once; each local layer is downloaded once.
        gets = Counter(e.path for e in reg.access_log()[before:] if e.method == "GET")
        repo = "/v2/test/mixed"
        config = json.loads(img._blob(img.manifest_digest))["config"]["digest"]
        assert "looked up ahead" in sb.snapshotter.log.read_text()
        assert gets[f"{repo}/manifests/v1"] == 2, gets
        assert gets[f"{repo}/manifests/{img.manifest_digest}"] == 0, gets
        assert gets[f"{repo}/blobs/{config}"] == 2, gets
        assert gets[f"{repo}/manifests/{img.index_digest}"] == 1, gets
        assert [gets[f"{repo}/blobs/{layer['digest']}"] for layer in img.layers[1:]] == [1, 1], gets
        known = {f"{repo}/blobs/{d}" for d in (config, *(layer["digest"] for layer in img.layers))}
        assert [n for path, n in gets.items() if "/blobs/" in path and path not in known] == [1], gets  # the zTOC
        rows = consistent(sb)
        modes = sorted(i.labels.get("containerd.io/snapshot/remote/soci.mode", "") for i in rows.values())
        assert modes == ["lazy", "local", "local"]
        out = ctr_retry(sb, "run", "--rm", "--snapshotter", "soci", img.ref, "rpulled", "/bin/busybox", "sh", "-c",
                        "cat /etc/greeting /etc/zstd-file")
        assert out.stdout == "hello from a small layer\nfrom the zstd layer\n"
        gc_all(sb)
        assert wait_for(lambda: backend(sb) == {}), sb.snapshotter.log_tail()
        assert mounts_below(sb.snapshotter.root) == []


def test_rpull_of_a_converted_image_prefetches_its_listed_files_at_mount(world: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """`soci convert --prefetch-file`: discovery fetches the artifact, the mount fetches its spans before any
    read, and the container then reads those files without another request for the layer."""
    img: Image = world["mixed"]
    reg: LocalRegistry = world["reg"]
    ctr_name = Path(str(shutil.which("ctr"))).name
    dst = img.ref.replace(":v1", ":prefetch")
    out = soci(tmp_path / "build", "convert", "--plain-http", "--span-size", str(SPAN), "--min-layer-size",
               str(MIN_LAYER), "--prefetch-file", f"/data/{ctr_name}", "--prefetch-file", "/bin/busybox", img.ref, dst)
    lazy = img.layers[0]["digest"]
    assert f"layer {lazy} -> prefetch sha256:" in out
    n_spans = int(out.split(f"layer {lazy} -> prefetch ")[1].split("(")[1].split()[0])
    want = hashlib.sha256((img.layout.parent / "mixed-r0" / "data" / ctr_name).read_bytes()).hexdigest()

    def layer_gets() -> int:
        return sum(1 for e in reg.access_log() if e.method == "GET" and e.path.endswith(lazy))

    with sandbox_with(tmp_path) as sb:
        c = sb.containerd
        before = layer_gets()
        r = subprocess.run([sys.executable, "-m", "soci_helper.cli.main", "--root", str(sb.snapshotter.root),
                            "-a", str(c.address), "-n", c.namespace, "image", "rpull", "--plain-http", dst],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr + sb.snapshotter.log_tail()
        logs = srv.mounts_dir(sb.snapshotter.root)
        done = f"prefetched {n_spans} spans"
        assert wait_for(lambda: any(done in p.read_text() for p in logs.glob("*.log")), timeout=30), \
            "".join(p.read_text() for p in logs.glob("*.log"))
        time.sleep(0.3)  # the registry logs a request just after answering it
        prefetched = layer_gets() - before
        assert 1 <= prefetched <= n_spans  # no read yet: only the prefetch asked for the layer
        run = ctr_retry(sb, "run", "--rm", "--snapshotter", "soci", dst, "prefetched", "/bin/busybox", "sha256sum",
                        f"/data/{ctr_name}")
        assert run.stdout.split()[0] == want
        time.sleep(0.3)
        assert layer_gets() - before == prefetched  # busybox and the file came from the span cache
        gc_all(sb)
        assert wait_for(lambda: backend(sb) == {}), sb.snapshotter.log_tail()


def test_pull_modes_disabled_leave_the_image_to_containerd(world: dict[str, Any], tmp_path: Path) -> None:
    """[pull_modes.soci_v1] enable = false: the image's v1 index is ignored, as if it had none."""
    from soci_helper import config as config_mod
    from soci_helper.snapshotter.service import build_snapshotter

    img: Image = world["mixed"]
    cfg = config_mod.parse(DAEMON_CONFIG + "\n[pull_modes.soci_v1]\nenable = false\n")
    sn = build_snapshotter(str(tmp_path / "root"), cfg)
    try:
        labels = layer_labels(img, 0)
        mounts = sn.prepare("k0", "", labels)
        assert [m.type for m in mounts] == ["bind"]
        assert mounts_below(tmp_path / "root") == [] and layer_servers(tmp_path / "root") == []
    finally:
        sn.close()


def test_images_are_remembered_between_prepares_in_a_bounded_cache(world: dict[str, Any], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from soci_helper.oci.reference import parse_reference
    from soci_helper.snapshotter import soci as soci_mod

    reg: LocalRegistry = world["reg"]
    mixed, plain = world["mixed"], world["plain"]
    monkeypatch.setattr(soci_mod, "IMAGE_CACHE_SIZE", 1)
    dec = soci_mod.SociDecider(tmp_path / "root")
    try:
        def fetches(img: Image) -> int:
            before = len(reg.access_log())
            info, _ = dec._image(parse_reference(img.ref), img.manifest_digest)
            assert info.manifest_digest == img.manifest_digest and list(info.chain_ids) == img.chain_ids
            return sum(1 for e in reg.access_log()[before:] if e.method == "GET")

        assert fetches(mixed) == 2  # its manifest and config
        assert fetches(mixed) == 0
        assert fetches(plain) == 2
        assert len(dec._images) == 1  # mixed made room for plain
        assert fetches(mixed) == 2
    finally:
        dec.close()


def test_a_pull_hint_looks_the_image_up_ahead_and_starts_a_spare_per_lazy_layer(world: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    from soci_helper import config as config_mod
    from soci_helper.mount.hints import send
    from soci_helper.oci.reference import parse_reference
    from soci_helper.snapshotter.soci import SociDecider
    from soci_helper.store.content import ContentStore

    reg: LocalRegistry = world["reg"]
    mixed, plain = world["mixed"], world["plain"]
    root = tmp_path / "root"
    dec = SociDecider(root, config_mod.load(daemon_config(tmp_path)))
    try:
        assert send(root, mixed.ref)
        assert wait_for(lambda: (mixed.manifest_digest, "") in dec._indexes, 30)
        # One lazy layer in this image: one spare, alive.
        assert wait_for(lambda: len(dec.spares._spares) == 1, 10)
        assert dec.spares._spares[0].proc.poll() is None
        found = dec._indexes[(mixed.manifest_digest, "")][0]
        assert found is not None and found.digest == mixed.index_digest
        store = ContentStore(root)
        assert all(store.has(z.digest) for z in found.index.ztocs)
        # The Prepare's lookups then find everything remembered: not one request to the registry.
        time.sleep(0.3)  # the registry logs a request just after answering it
        seen = len(reg.access_log())
        info, fetched = dec._image(parse_reference(mixed.ref), mixed.manifest_digest)
        assert fetched is None and dec._index(info, None) is found
        time.sleep(0.3)
        assert len(reg.access_log()) == seen
        # An image without an index: looked up too, and no spare is kept for it.
        assert send(root, plain.ref)
        assert wait_for(lambda: (plain.manifest_digest, "") in dec._indexes, 30)
        assert wait_for(lambda: not dec.spares._spares, 10)
        # A hint the daemon cannot use (no such registry) costs nothing and breaks nothing.
        assert send(root, "127.0.0.1:9/none/such:latest")
        assert send(root, mixed.ref)
        assert wait_for(lambda: len(dec.spares._spares) == 1, 10)
    finally:
        dec.close()
    assert not dec.spares._spares


def test_per_image_locks_serialise_and_leave_nothing_behind(tmp_path: Path) -> None:
    import threading

    from soci_helper.snapshotter import soci as soci_mod

    dec = soci_mod.SociDecider(tmp_path / "root")
    try:
        inside: list[str] = []
        overlap: list[bool] = []

        def work(key: str) -> None:
            with dec._once(key):
                overlap.append(key in inside)
                inside.append(key)
                time.sleep(0.05)
                inside.remove(key)

        threads = [threading.Thread(target=work, args=(k,)) for k in ("a", "a", "a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert overlap == [False] * 4  # never two holders of one image's lock at once
        assert dec._key_locks == {}  # and no lock kept for images no Prepare is working on
    finally:
        dec.close()
