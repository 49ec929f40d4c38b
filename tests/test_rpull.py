"""`soci image rpull` against a real containerd 1.6, runc, our snapshotter and a real registry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import one_error_line, soci
from support.containers import busybox_trees, wait_for

from soci_helper.containerd import rpull as rp
from soci_helper.fs.server import MODULE as SERVER_MODULE
from soci_helper.oci.layout import OCILayout
from soci_helper.oci.manifest import Descriptor
from soci_helper.sandbox.containerd import SociSandbox
from soci_helper.sandbox.images import tar_of, write_image
from soci_helper.sandbox.procs import pids_matching
from soci_helper.sandbox.registry import LocalRegistry
from soci_helper.snapshotter.remote import LayerRequest, RemoteLayer, lazy_unmount
from soci_helper.snapshotter.service import Server, Snapshotter

_E2E_TOOLS = ("containerd", "ctr", "runc", "docker-registry", "skopeo")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="containerd and runc need root")
needs_tools = pytest.mark.skipif(not all(shutil.which(t) for t in _E2E_TOOLS),
                                 reason="containerd, runc, docker-registry or skopeo missing")
pytestmark = [pytest.mark.timeout(110)]

FAKE_INDEX = "sha256:" + "5e" * 32


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- what containerd would compute ------------------------------------------------------------------------------

def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = (_sha(x) for x in (b"a", b"b", b"c"))
    ab = _sha(f"{a} {b}".encode())
    assert rp.chain_ids([a, b, c]) == [a, ab, _sha(f"{ab} {c}".encode())]
    assert rp.chain_ids([]) == []


def test_child_gc_labels_number_per_kind_like_containerd() -> None:
    cfg = Descriptor("application/vnd.oci.image.config.v1+json", _sha(b"c"), 1)
    l0 = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", _sha(b"0"), 1)
    l1 = Descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", _sha(b"1"), 1)
    assert rp.child_gc_labels([cfg, l0, l1]) == {
        "containerd.io/gc.ref.content.config": cfg.digest,
        "containerd.io/gc.ref.content.l.0": l0.digest,
        "containerd.io/gc.ref.content.l.1": l1.digest,
    }
    m0 = Descriptor("application/vnd.oci.image.manifest.v1+json", _sha(b"m0"), 1)
    m1 = Descriptor("application/vnd.docker.distribution.manifest.v2+json", _sha(b"m1"), 1)
    other = Descriptor("application/vnd.oci.image.index.v1+json", _sha(b"i"), 1)
    assert rp.child_gc_labels([m0, other, m1]) == {
        "containerd.io/gc.ref.content.m.0": m0.digest,
        "containerd.io/gc.ref.content.0": other.digest,
        "containerd.io/gc.ref.content.m.1": m1.digest,
    }


def test_distribution_source_drops_the_port_and_merges_repos() -> None:
    assert rp.distribution_source("127.0.0.1:5000", "a/b") == ("containerd.io/distribution.source.127.0.0.1", "a/b")
    assert rp.distribution_source("reg.example", "z", "y,a") == ("containerd.io/distribution.source.reg.example",
                                                                 "a,y,z")
    assert rp.distribution_source("reg.example", "a", "a") == ("containerd.io/distribution.source.reg.example", "a")


def test_layer_list_labels_are_capped_at_containerds_label_size() -> None:
    layers = [Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", _sha(str(i).encode()), 1000 + i)
              for i in range(100)]
    labels = rp.layer_labels("r.example/x:1", _sha(b"m"), layers, 3, _sha(b"chain"))
    digests = labels[rp.IMAGE_LAYERS_LABEL].split(",")
    sizes = labels[rp.IMAGE_LAYERS_SIZE_LABEL].split(",")
    assert digests[0] == layers[3].digest and len(digests) < 97
    assert len(rp.IMAGE_LAYERS_LABEL) + len(labels[rp.IMAGE_LAYERS_LABEL]) <= 4096
    assert len(rp.IMAGE_LAYERS_LABEL) + len(labels[rp.IMAGE_LAYERS_LABEL]) + 72 > 4096  # as many as fit
    assert sizes == [str(d.size) for d in layers[3:3 + len(digests)]]
    assert rp.SOCI_INDEX_DIGEST_LABEL not in labels
    assert all(k == rp.SNAPSHOT_REF_LABEL or k.startswith("containerd.io/snapshot/") for k in labels)


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two layers: a static busybox with applet links, then a file of its own; plus the first one extracted."""
    t = tmp_path_factory.mktemp("rpull-img")
    r1, r2 = busybox_trees(t)
    l1, l2 = tar_of(t / "l1.tar", str(r1), ["bin"]), tar_of(t / "l2.tar", str(r2), ["etc"])
    desc = write_image(t / "layout", [l1, l2], "latest")
    manifest_bytes = OCILayout(t / "layout").read_blob(desc.digest)
    layers = [Descriptor.from_json(d) for d in json.loads(manifest_bytes)["layers"]]
    chain = rp.chain_ids([_sha(l1.read_bytes()), _sha(l2.read_bytes())])
    return {"layout": t / "layout", "manifest": desc.digest, "layers": layers, "chain": chain, "tree1": r1}


@pytest.fixture(scope="module")
def registry(built: dict[str, Any]) -> Iterator[tuple[LocalRegistry, str]]:
    with LocalRegistry() as reg:
        ref = reg.push_oci_layout(built["layout"], "rpull/busybox:latest")
        yield reg, ref


def _ctr_snapshots(sb: SociSandbox) -> dict[str, tuple[str, str]]:
    rows = sb.containerd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout.splitlines()[1:]
    out = {}
    for line in rows:
        parts = line.split()
        out[parts[0]] = (parts[1] if len(parts) == 3 else "", parts[-1])
    return out


def _backend_names(sb: SociSandbox) -> list[str]:
    from soci_helper.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb

    from soci_helper.containerd import client

    ch = client.channel(str(sb.snapshotter.address))
    try:
        return [i.name for resp in client.snapshots_stub(ch).List(pb.ListSnapshotsRequest()) for i in resp.info]
    finally:
        ch.close()


# --- (a) a plain image: every layer unpacked locally ------------------------------------------------------------

@needs_root
@needs_tools
def test_rpull_plain_image_run_idempotent_and_gc(built: dict[str, Any], registry: tuple[LocalRegistry, str],
                                                 tmp_path: Path) -> None:
    reg, ref = registry
    chain1, chain2 = built["chain"]
    with SociSandbox() as sb:
        c = sb.containerd
        args = ("-a", str(c.address), "-n", c.namespace, "image", "rpull", "--plain-http", ref)
        r = soci(tmp_path, *args)
        lines = r.stdout.splitlines()
        assert all(": unpacked, " in ln and ln.endswith("B downloaded") for ln in lines[:2]), lines
        assert lines[0].startswith("layer 1/2 ") and lines[1].startswith("layer 2/2 ")
        assert lines[2].startswith(f"pulled {ref} ") and "2 unpacked" in lines[2] and "MB downloaded" in lines[2]

        assert _ctr_snapshots(sb) == {chain1: ("", "Committed"), chain2: (chain1, "Committed")}
        assert ref in c.ctr("images", "ls", "-q").stdout.split()
        # The lease is gone: the image record and the GC labels hold everything now.
        assert c.ctr("leases", "ls", "-q").stdout.split() == []
        labels = _content_labels(c, built["manifest"])
        assert labels["containerd.io/gc.ref.content.l.0"] == built["layers"][0].digest
        assert labels["containerd.io/gc.ref.content.l.1"] == built["layers"][1].digest
        assert labels["containerd.io/distribution.source.127.0.0.1"] == "rpull/busybox"
        config = labels["containerd.io/gc.ref.content.config"]
        assert _content_labels(c, config)["containerd.io/gc.ref.snapshot.soci"] == chain2
        assert _content_labels(c, built["layers"][1].digest)["containerd.io/uncompressed"] == _sha(
            (built["layout"].parent / "l2.tar").read_bytes())

        run = c.ctr("run", "--rm", "--snapshotter", "soci", ref, "rpull-a", "/bin/busybox", "sh", "-c",
                    "echo hello; cat /etc/greeting")
        assert run.stdout == "hello\nfrom the second layer\n"

        # Twice: nothing new is fetched or unpacked, the record is rewritten in place.
        before = len(reg.access_log())
        r = soci(tmp_path, *args)
        assert all(ln.endswith(": exists") for ln in r.stdout.splitlines()[:2]), r.stdout
        assert not any("/blobs/" in e.path and e.method == "GET" and e.path.endswith(tuple(
            d.digest for d in built["layers"])) for e in reg.access_log()[before:])
        assert c.ctr("images", "ls", "-q").stdout.split().count(ref) == 1
        assert len(_ctr_snapshots(sb)) == 2

        # A snapshotter containerd does not know: one line, not a traceback.
        line = one_error_line(soci(tmp_path, *args[:5], "rpull", "--plain-http", "--snapshotter", "nosuch", ref,
                                   ok=False))
        assert "nosuch" in line
        # An image the registry does not have.
        line = one_error_line(soci(tmp_path, *args[:6], "--plain-http", f"{reg.host}/rpull/missing:latest", ok=False))
        assert "rpull/missing" in line and "not found" in line
        assert c.ctr("leases", "ls", "-q").stdout.split() == []

        c.ctr("images", "rm", "--sync", ref)
        c.ctr("content", "prune", "references", check=False)
        assert _ctr_snapshots(sb) == {}
        assert wait_for(lambda: _backend_names(sb) == [])
        assert list((sb.snapshotter.root / "snapshotter" / "snapshots").iterdir()) == []


def _content_labels(c: Any, digest: str) -> dict[str, str]:
    from soci_helper.containerd.client import Containerd

    with Containerd(str(c.address), c.namespace) as cd:
        labels = cd.content_labels(digest)
    assert labels is not None, f"{digest} not in the content store"
    return labels


# --- (b) the labels reach the snapshotter; a remote layer is never downloaded -----------------------------------

class RecordingDecider:
    """Keeps every Prepare's labels; takes one chainID as remote by bind-mounting a pre-extracted tree."""

    def __init__(self, remote_chain: str, tree: Path) -> None:
        self.remote, self.tree = remote_chain, tree
        self.requests: list[LayerRequest] = []

    def prepare(self, req: LayerRequest) -> RemoteLayer | None:
        self.requests.append(req)
        if req.target != self.remote:
            return None
        subprocess.run(["mount", "--bind", str(self.tree), str(req.mountpoint)], check=True)
        return RemoteLayer(labels={"containerd.io/snapshot/remote": "test-bind"})

    def release(self, mountpoint: Path) -> None:
        lazy_unmount(mountpoint)


@needs_root
@needs_tools
def test_rpull_labels_and_remote_layer(built: dict[str, Any], registry: tuple[LocalRegistry, str]) -> None:
    reg, ref = registry
    chain1, chain2 = built["chain"]
    l1, l2 = built["layers"]
    decider = RecordingDecider(chain1, built["tree1"])
    sb = SociSandbox(run_daemon=False)
    server = Server(str(sb.snapshotter.address), Snapshotter(sb.snapshotter.root, decider=decider), workers=4)
    server.start()
    try:
        sb.start()
        c = sb.containerd
        before = len(reg.access_log())
        res = rp.rpull(str(c.address), c.namespace, ref, reg.source_options(),
                       rp.RpullOptions(index_digest=FAKE_INDEX))
        assert [x.state for x in res.layers] == [rp.STATE_LAZY, rp.STATE_UNPACKED]
        assert res.manifest_digest == built["manifest"] and res.chain_id == chain2

        common = {
            "containerd.io/snapshot/cri.image-ref": ref,
            "containerd.io/snapshot/cri.manifest-digest": built["manifest"],
            "containerd.io/snapshot/remote/soci.index.digest": FAKE_INDEX,
        }
        assert [(r.target, r.parent.rsplit("/", 1)[-1]) for r in decider.requests] == [(chain1, ""), (chain2, chain1)]
        assert dict(decider.requests[0].labels) == {
            **common,
            "containerd.io/snapshot.ref": chain1,
            "containerd.io/snapshot/cri.layer-digest": l1.digest,
            "containerd.io/snapshot/cri.image-layers": f"{l1.digest},{l2.digest}",
            "containerd.io/snapshot/remote/soci.size": str(l1.size),
            "containerd.io/snapshot/remote/image.layers.size": f"{l1.size},{l2.size}",
        }
        assert dict(decider.requests[1].labels) == {
            **common,
            "containerd.io/snapshot.ref": chain2,
            "containerd.io/snapshot/cri.layer-digest": l2.digest,
            "containerd.io/snapshot/cri.image-layers": l2.digest,
            "containerd.io/snapshot/remote/soci.size": str(l2.size),
            "containerd.io/snapshot/remote/image.layers.size": str(l2.size),
        }

        blob_gets = [e.path for e in reg.access_log()[before:] if e.method == "GET" and "/blobs/" in e.path]
        assert not any(l1.digest in p for p in blob_gets), blob_gets
        assert any(l2.digest in p for p in blob_gets)
        assert res.downloaded < l1.size
        # The pull asks for the manifest and the config once each, then only for the layer it unpacks.
        config = json.loads(OCILayout(built["layout"]).read_blob(built["manifest"]))["config"]["digest"]
        repo = "/v2/rpull/busybox"
        assert [(e.method, e.path) for e in reg.access_log()[before:]] == [
            ("GET", f"{repo}/manifests/latest"), ("GET", f"{repo}/blobs/{config}"),
            ("GET", f"{repo}/blobs/{l2.digest}")]

        assert _ctr_snapshots(sb) == {chain1: ("", "Committed"), chain2: (chain1, "Committed")}
        run = c.ctr("run", "--rm", "--snapshotter", "soci", ref, "rpull-b", "/bin/busybox", "sh", "-c",
                    "echo hello; cat /etc/greeting")
        assert run.stdout == "hello\nfrom the second layer\n"
        assert c.ctr("leases", "ls", "-q").stdout.split() == []
    finally:
        try:
            sb.stop()
        finally:
            server.stop(0)


# --- (c) errors: one line, non-zero ------------------------------------------------------------------------------

def test_rpull_unreachable_containerd_is_one_line(registry: tuple[LocalRegistry, str], tmp_path: Path) -> None:
    _, ref = registry
    line = one_error_line(soci(tmp_path, "-a", str(tmp_path / "none.sock"), "image", "rpull", "--plain-http", ref,
                               ok=False))
    assert "cannot connect to containerd" in line and "none.sock" in line
    # A socket file nobody listens on (a crashed containerd's leftover).
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
        line = one_error_line(soci(tmp_path, "-a", str(stale), "image", "rpull", "--plain-http", ref, ok=False))
    assert "cannot connect to containerd" in line and "refused" in line


# --- (d) the real SOCI decider: an indexed layer is mounted lazily ----------------------------------------------

def _real_decider_ready() -> bool:
    try:
        from soci_helper.snapshotter import service, soci  # noqa: F401
    except ImportError:
        return False
    return hasattr(service, "build_snapshotter") and Path("/sbin/mount.fuse.soci").exists()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, built: dict[str, Any],
            registry: tuple[LocalRegistry, str]) -> dict[str, Any]:
    """busybox, then a 16 MiB layer of random files, pushed with a v1 SOCI index (1 MiB spans)."""
    reg, _ = registry
    t = tmp_path_factory.mktemp("rpull-big")
    big = t / "big" / "big"
    big.mkdir(parents=True)
    (big / "a-hello.txt").write_text("hello from a lazy layer\n")
    for i in range(16):
        (big / f"f{i:02d}").write_bytes(os.urandom(1 << 20))
    l1 = built["layout"].parent / "l1.tar"
    l2 = tar_of(t / "big.tar", str(t / "big"), ["big"])
    write_image(t / "layout", [l1, l2], "latest")
    ref = reg.push_oci_layout(t / "layout", "rpull/indexed:latest")
    root = t / "store"
    r = soci(root, "create", "--plain-http", "--span-size", str(1 << 20), ref)
    assert "ztoc" in r.stdout, r.stdout
    soci(root, "push", "--plain-http", ref)
    manifest = json.loads(OCILayout(t / "layout").read_blob(OCILayout(t / "layout").resolve("latest").digest))
    return {"ref": ref, "big": Descriptor.from_json(manifest["layers"][1])}


def _fuse_mounts_under(path: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "fuse.soci" and left.split()[4].startswith(str(path)):
            out.append(left.split()[4])
    return out


@needs_root
@needs_tools
@pytest.mark.skipif(not _real_decider_ready(), reason="the SOCI decider or mount.fuse.soci is not available")
def test_rpull_with_the_soci_decider_mounts_the_indexed_layer(indexed: dict[str, Any],
                                                               registry: tuple[LocalRegistry, str],
                                                               tmp_path: Path) -> None:
    reg, _ = registry
    ref, big = indexed["ref"], indexed["big"]
    with SociSandbox() as sb:
        c = sb.containerd
        before = len(reg.access_log())
        r = soci(tmp_path, "-a", str(c.address), "-n", c.namespace, "image", "rpull", "--plain-http", ref)
        lines = r.stdout.splitlines()
        # busybox has no zTOC: the snapshotter itself unpacks it (upstream's behaviour for an indexed image).
        assert ": unpacked" in lines[0] and lines[1].endswith(": lazy"), r.stdout
        snapdirs = sb.snapshotter.root / "snapshotter" / "snapshots"
        assert len(_fuse_mounts_under(snapdirs)) == 1
        # The layer server is the spare the daemon started at the image's first Prepare, and with no lazy
        # layer left to mount, no other spare waits.
        servers = pids_matching(SERVER_MODULE, str(sb.snapshotter.root))
        assert len(servers) == 1 and "--spare" in Path(f"/proc/{servers[0]}/cmdline").read_text().split("\0")
        run = c.ctr("run", "--rm", "--snapshotter", "soci", ref, "rpull-d", "/bin/busybox", "cat",
                    "/big/a-hello.txt")
        assert run.stdout == "hello from a lazy layer\n"
        served = sum(e.size for e in reg.access_log()[before:] if big.digest in e.path)
        assert served < big.size // 4, (served, big.size)


def test_index_path_walks_nested_indexes_to_the_manifest() -> None:
    def index(*children: Descriptor) -> bytes:
        return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": [c.to_json() for c in children]}).encode()

    man = Descriptor("application/vnd.oci.image.manifest.v1+json", _sha(b"m"), 1)
    other = Descriptor("application/vnd.oci.image.manifest.v1+json", _sha(b"o"), 1)
    inner_bytes = index(other, man)
    inner = Descriptor("application/vnd.oci.image.index.v1+json", _sha(inner_bytes), len(inner_bytes))
    top_bytes = index(other, inner)
    top = Descriptor("application/vnd.oci.image.index.v1+json", _sha(top_bytes), len(top_bytes))
    blobs = {top.digest: top_bytes, inner.digest: inner_bytes}

    class Source:
        def fetch_manifest(self, d: Descriptor) -> bytes:
            return blobs[d.digest]

    path = rp._index_path(Source(), top, man.digest)  # type: ignore[arg-type]
    assert [d.digest for d, _ in path] == [top.digest, inner.digest]
    assert rp._index_path(Source(), man, man.digest) == []  # type: ignore[arg-type]
    assert rp.child_gc_labels([other, inner]) == {"containerd.io/gc.ref.content.m.0": other.digest,
                                                  "containerd.io/gc.ref.content.0": inner.digest}
