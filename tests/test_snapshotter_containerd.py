"""End to end with a real containerd 1.6 and runc: pull into our snapshotter, run a container, GC."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.containers import busybox_trees, wait_for

from soci_helper.containerd import client
from soci_helper.sandbox.containerd import SociSandbox
from soci_helper.sandbox.images import tar_of, write_image
from soci_helper.sandbox.procs import pids_matching
from soci_helper.sandbox.registry import LocalRegistry
from soci_helper.snapshotter.remote import LayerRequest, RemoteLayer
from soci_helper.snapshotter.service import Server, Snapshotter

pytestmark = [
    pytest.mark.timeout(110),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd and runc need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "docker-registry", "skopeo")),
                       reason="containerd, runc, docker-registry or skopeo missing"),
]

pb: Any = importlib.import_module("soci_helper.containerd.api.services.snapshots.v1.snapshots_pb2")


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers: a static busybox with a few applet links, then a file of its own."""
    t = tmp_path_factory.mktemp("img")
    r1, r2 = busybox_trees(t)
    write_image(t / "layout", [tar_of(t / "l1.tar", str(r1), ["bin"]), tar_of(t / "l2.tar", str(r2), ["etc"])],
                "latest")
    return t / "layout"


@pytest.fixture
def sandbox() -> Iterator[SociSandbox]:
    sb = SociSandbox()
    sb.start()
    try:
        yield sb
    finally:
        address = str(sb.containerd.address)
        d = sb.dir
        sb.stop()
        # Nothing of this containerd may survive: shims, mounts, directories.
        assert pids_matching(address) == []
        assert not d.exists()


def _backend(sb: SociSandbox) -> list[Any]:
    ch = client.channel(str(sb.snapshotter.address))
    try:
        out = []
        for resp in client.snapshots_stub(ch).List(pb.ListSnapshotsRequest()):
            out.extend(resp.info)
        return out
    finally:
        ch.close()


def _ctr_ls(sb: SociSandbox) -> dict[str, tuple[str, str]]:
    rows = sb.containerd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout.splitlines()[1:]
    out = {}
    for line in rows:
        parts = line.split()
        key, kind = parts[0], parts[-1]
        parent = parts[1] if len(parts) == 3 else ""
        out[key] = (parent, kind)
    return out


def test_pull_run_and_gc(sandbox: SociSandbox, image_layout: Path) -> None:
    c = sandbox.containerd
    with LocalRegistry() as reg:
        ref = reg.push_oci_layout(image_layout, "busybox:latest")
        c.ctr("images", "pull", "--plain-http", "--snapshotter", "soci", ref)

    # containerd unpacked both layers through our Prepare/Commit.
    seen = _ctr_ls(sandbox)
    assert len(seen) == 2 and all(kind == "Committed" for _, kind in seen.values())
    backend = _backend(sandbox)
    assert len(backend) == 2 and all(i.kind == pb.COMMITTED for i in backend)
    # The backend's keys are containerd's, namespaced: `ns/N/<chainID>`.
    by_chain = {i.name.rsplit("/", 1)[-1]: i for i in backend}
    assert set(by_chain) == set(seen)
    for chain, (parent, _) in seen.items():
        bparent = by_chain[chain].parent
        assert (bparent.rsplit("/", 1)[-1] if bparent else "") == parent
        assert by_chain[chain].name.startswith(c.namespace + "/")

    r = c.ctr("run", "--rm", "--snapshotter", "soci", ref, "soci-e2e", "/bin/busybox", "sh", "-c",
              "echo hello; cat /etc/greeting")
    assert r.stdout.splitlines() == ["hello", "from the second layer"]
    # --rm removed the container's snapshot from containerd at once, and from us at its next GC.
    assert len(_ctr_ls(sandbox)) == 2
    assert wait_for(lambda: len(_backend(sandbox)) == 2)

    # Removing the image lets containerd's GC remove the snapshots, and with them their directories.
    c.ctr("images", "rm", "--sync", ref)
    c.ctr("content", "prune", "references", check=False)
    assert _ctr_ls(sandbox) == {}
    assert wait_for(lambda: _backend(sandbox) == [])
    snapdirs = sandbox.snapshotter.root / "snapshotter" / "snapshots"
    assert list(snapdirs.iterdir()) == []


def test_left_running_container_is_cleaned_up(image_layout: Path) -> None:
    """A test that fails with a container still running must not leak it, its shim or its mounts."""
    sb = SociSandbox()
    sb.start()
    try:
        c = sb.containerd
        c.ctr("images", "import", "--snapshotter", "soci", "--index-name", "local/bb:latest",
              str(_archive(image_layout, sb.dir)))
        c.ctr("run", "-d", "--snapshotter", "soci", "local/bb:latest", "soci-left", "/bin/busybox", "sleep", "4242")
        assert wait_for(lambda: bool(pids_matching("4242")))
        assert pids_matching(str(c.address))  # its shim
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(sb.dir) in mounts  # the container's rootfs overlay
    finally:
        d, address = sb.dir, str(sb.containerd.address)
        sb.stop()
    assert pids_matching(address) == [] and pids_matching("4242") == []
    assert str(d) not in Path("/proc/self/mountinfo").read_text()
    assert not d.exists()
    assert not (Path("/run/containerd/runc") / sb.containerd.namespace).exists()


def _archive(layout: Path, where: Path) -> Path:
    """The OCI layout as a tar archive, which `ctr images import` takes."""
    out = where / "image.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(out), "."], check=True)
    return out


class ExtractingDecider:
    """Stands in for a lazy mount: 'mounts' a layer by extracting its tar into the mountpoint, so that
    containerd's ALREADY_EXISTS + List + Stat handshake is exercised for real."""

    def __init__(self, tars_by_chain: dict[str, Path]) -> None:
        self.tars = tars_by_chain
        self.hits: list[str] = []

    def prepare(self, req: LayerRequest) -> RemoteLayer | None:
        tar = self.tars.get(req.target)
        if tar is None:
            return None
        subprocess.run(["tar", "-C", str(req.mountpoint), "-xf", str(tar)], check=True)
        self.hits.append(req.target)
        return RemoteLayer(labels={"containerd.io/snapshot/remote": "test"})

    def release(self, mountpoint: Path) -> None:
        pass


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_remote_handshake_with_containerd(image_layout: Path) -> None:
    """What `soci image rpull` will do: Prepare with the target label through containerd's own snapshots
    API; the decider takes the layer, we answer ALREADY_EXISTS, containerd finds our snapshot by List."""
    l1, l2 = image_layout.parent / "l1.tar", image_layout.parent / "l2.tar"
    chain1 = _sha(l1.read_bytes())
    chain2 = _sha(f"{chain1} {_sha(l2.read_bytes())}".encode())
    decider = ExtractingDecider({chain1: l1, chain2: l2})
    sb = SociSandbox(run_daemon=False)
    sn = Snapshotter(sb.snapshotter.root, decider=decider)
    server = Server(str(sb.snapshotter.address), sn, workers=4)
    server.start()
    try:
        sb.start()
        c = sb.containerd
        ch = client.channel(str(c.address))
        try:
            stub = client.snapshots_stub(ch)
            md = client.namespace_metadata(c.namespace)
            # Without a lease containerd's GC may collect the new snapshots before an image holds them.
            leases: Any = importlib.import_module("soci_helper.containerd.api.services.leases.v1.leases_pb2")
            client.leases_stub(ch).Create(leases.CreateRequest(id="soci-test"), metadata=md)
            md = client.namespace_metadata(c.namespace, lease="soci-test")
            for key, parent, chain in [("extract-1 " + chain1, "", chain1), ("extract-2 " + chain2, chain1, chain2)]:
                req = pb.PrepareSnapshotRequest(snapshotter="soci", key=key, parent=parent,
                                                labels={"containerd.io/snapshot.ref": chain})
                with pytest.raises(grpc.RpcError) as ei:
                    stub.Prepare(req, metadata=md)
                assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
        finally:
            ch.close()
        assert decider.hits == [chain1, chain2]
        assert _ctr_ls(sb) == {chain1: ("", "Committed"), chain2: (chain1, "Committed")}
        backend = _backend(sb)
        assert sorted(i.name for i in backend) == sorted([chain1, chain2])
        assert all(i.labels["containerd.io/snapshot/remote"] == "test" for i in backend)
        # The image's unpack finds its chain already there and prepares nothing more.
        c.ctr("images", "import", "--snapshotter", "soci", "--index-name", "local/bb:latest",
              str(_archive(image_layout, sb.dir)))
        assert len(_backend(sb)) == 2
        r = c.ctr("run", "--rm", "--snapshotter", "soci", "local/bb:latest", "soci-remote", "/bin/busybox", "sh",
                  "-c", "echo hello; cat /etc/greeting")
        assert r.stdout == "hello\nfrom the second layer\n"
    finally:
        try:
            sb.stop()
        finally:
            server.stop(0)
