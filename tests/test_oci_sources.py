"""Image sources against real content: OCI layout dirs, OCI archives and live registries (plain, TLS+auth)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.registry import (
    BuiltImage,
    LocalRegistry,
    archive_layout,
    build_image,
    build_multiplatform_image,
)

from soci_helper import digest
from soci_helper.errors import DigestError, NotFound, ReferenceError_, RegistryError, SociError
from soci_helper.oci import mediatype as mt
from soci_helper.oci.auth import Credentials
from soci_helper.oci.manifest import Descriptor, ImageManifest, parse_image_manifest
from soci_helper.oci.platform import host_platform, normalize
from soci_helper.oci.registry import RegistryClient, RegistryOptions, close_clients
from soci_helper.oci.source import ImageSource, SourceOptions, open_source, read_config, select_images, select_manifests

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, BuiltImage]:
    base = tmp_path_factory.mktemp("images")
    single = build_image(base / "single", tag="v1")
    multi = build_multiplatform_image(base / "multi", tag="v1",
                                      platforms=["linux/amd64", "linux/arm64/v8", "linux/arm/v7"])
    archive_layout(single.path, base / "single.tar")
    archive_layout(multi.path, base / "multi.tar")
    return {"single": single, "multi": multi, "base": base}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def plain_reg(images) -> Iterator[LocalRegistry]:
    with LocalRegistry() as reg:
        reg.push_oci_layout(images["single"].path, "demo/single:v1", tag="v1")
        reg.push_oci_layout(images["multi"].path, "demo/multi:v1", tag="v1")
        reg.push_oci_layout(images["single"].path, "demo/docker:v1", tag="v1", fmt="v2s2")
        yield reg
    close_clients()


@pytest.fixture(scope="module")
def tls_reg(images) -> Iterator[LocalRegistry]:
    with LocalRegistry(tls=True, auth=True) as reg:
        reg.push_oci_layout(images["single"].path, "demo/single:v1", tag="v1")
        reg.push_oci_layout(images["multi"].path, "demo/multi:v1", tag="v1")
        yield reg
    close_clients()


def _open(kind: str, name: str, images, request) -> ImageSource:
    base: Path = images["base"]
    if kind == "oci":
        return open_source(f"oci:{base / name}:v1")
    if kind == "archive":
        return open_source(f"oci-archive:{base / name}.tar:v1")
    reg: LocalRegistry = request.getfixturevalue("plain_reg" if kind == "plain" else "tls_reg")
    return open_source(f"{reg.host}/demo/{name}:v1", reg.source_options())


KINDS = ["oci", "archive", "plain", "tls"]


@pytest.mark.parametrize("kind", KINDS)
def test_same_image_everywhere(kind: str, images, request) -> None:
    img: BuiltImage = images["single"]
    src = _open(kind, "single", images, request)
    top = src.resolve()
    assert (top.digest, top.media_type) == (img.top_digest, mt.OCI_MANIFEST)
    assert src.fetch_manifest(top) == img.blob(img.top_digest)
    [info] = select_manifests(src)
    assert info.descriptor.digest == img.top_digest
    assert info.platform is not None and str(info.platform) == "linux/amd64"  # from the config
    assert src.read_blob(info.manifest.config) == img.configs[info.manifest.config.digest]
    for layer in info.manifest.layers:
        data = img.layers[layer.digest]
        assert b"".join(src.open_blob(layer)) == data
        assert mt.layer_compression(layer.media_type) is mt.Compression.GZIP
        # Ranges: inside, clipped at the end, empty past the end.
        assert src.read_blob_range(layer, 100, 1000) == data[100:1100]
        assert src.read_blob_range(layer, layer.size - 10, 100) == data[-10:]
        assert src.read_blob_range(layer, 0, layer.size) == data
        assert src.read_blob_range(layer, layer.size, 5) == b""
        assert src.read_blob_range(layer, 5, 0) == b""


@pytest.mark.parametrize("kind", KINDS)
def test_platform_selection(kind: str, images, request) -> None:
    img: BuiltImage = images["multi"]
    src = _open(kind, "multi", images, request)
    top = src.resolve()
    assert (top.digest, top.media_type) == (img.top_digest, mt.OCI_INDEX)

    [arm] = select_manifests(src, platform="linux/arm64")
    assert arm.descriptor.digest == img.manifests["linux/arm64/v8"]
    assert str(arm.platform) == "linux/arm64/v8"
    [arm_v8] = select_manifests(src, platform="linux/aarch64/v8")
    assert arm_v8.descriptor.digest == arm.descriptor.digest
    [armv7] = select_manifests(src, platform="linux/arm")
    assert armv7.descriptor.digest == img.manifests["linux/arm/v7"]

    host = normalize(host_platform())
    if f"{host.os}/{host.architecture}" in ("linux/amd64", "linux/arm64"):
        [mine] = select_manifests(src)
        assert normalize(mine.platform).architecture == host.architecture  # type: ignore[arg-type]

    every = select_manifests(src, all_platforms=True)
    assert [i.descriptor.digest for i in every] == [img.manifests[p] for p in
                                                    ("linux/amd64", "linux/arm64/v8", "linux/arm/v7")]
    assert all(isinstance(i.manifest, ImageManifest) for i in every)

    with pytest.raises(NotFound) as ei:
        select_manifests(src, platform="linux/s390x")
    msg = str(ei.value)
    assert "linux/s390x" in msg and "linux/amd64" in msg and "linux/arm64/v8" in msg and "\n" not in msg


def test_skopeo_made_archive(images, tmp_path) -> None:
    archive = tmp_path / "by-skopeo.tar"
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    subprocess.run(["skopeo", "--policy", str(policy), "copy", "--quiet", "--all",
                    f"oci:{images['multi'].path}:v1", f"oci-archive:{archive}:v1"],
                   check=True, capture_output=True, timeout=60)
    src = open_source(f"oci-archive:{archive}:v1")
    every = select_manifests(src, all_platforms=True)
    assert len(every) == 3
    layer = every[0].manifest.layers[1]
    assert src.read_blob(layer) == images["multi"].layers[layer.digest]
    # Without a tag the only image is used.
    assert open_source(f"oci-archive:{archive}").resolve().digest == images["multi"].top_digest


def test_docker_media_types(plain_reg, images) -> None:
    img: BuiltImage = images["single"]
    src = open_source(f"{plain_reg.host}/demo/docker:v1", plain_reg.source_options())
    top = src.resolve()
    assert top.media_type == mt.DOCKER_MANIFEST
    [info] = select_manifests(src)
    assert info.manifest.media_type == mt.DOCKER_MANIFEST
    assert info.manifest.config.media_type == mt.DOCKER_CONFIG
    for layer in info.manifest.layers:
        assert layer.media_type == mt.DOCKER_LAYER_GZIP
        assert mt.layer_compression(layer.media_type) is mt.Compression.GZIP
        assert src.read_blob(layer) == img.layers[layer.digest]
    # Fetching by digest verifies and gives the same bytes.
    by_digest = open_source(f"{plain_reg.host}/demo/docker@{top.digest}", plain_reg.source_options())
    assert by_digest.resolve().digest == top.digest


def test_registry_source_asks_for_each_manifest_and_config_once(plain_reg) -> None:
    before = len(plain_reg.access_log())
    src = open_source(f"{plain_reg.host}/demo/single:v1", plain_reg.source_options())
    top = src.resolve()
    [info] = select_manifests(src)  # no platform in the descriptor: the config says which
    assert info.platform is not None and read_config(src, info) == info.config
    multi = open_source(f"{plain_reg.host}/demo/multi:v1", plain_reg.source_options())
    assert len(select_images(multi, SourceOptions(platform="linux/amd64,linux/arm64"))) == 2
    assert multi.resolve() == multi.resolve()
    gets = Counter(e.path for e in plain_reg.access_log()[before:] if e.method == "GET")
    assert gets["/v2/demo/single/manifests/v1"] == 1 and gets["/v2/demo/multi/manifests/v1"] == 1, gets
    assert gets[f"/v2/demo/single/blobs/{info.manifest.config.digest}"] == 1, gets
    assert set(gets.values()) == {1}, gets
    # Pushing under the source's own tag moves what it resolves to, without asking the registry again.
    moving = open_source(f"{plain_reg.host}/demo/single:moving", plain_reg.source_options())
    assert moving.push_manifest(info.raw, top.media_type, tag="moving") == moving.resolve() == top
    changed = info.raw.replace(b"{", b'{"annotations": {"moved": "yes"}, ', 1)
    pushed = moving.push_manifest(changed, top.media_type, tag="moving")
    assert moving.resolve() == pushed != top and moving.fetch_manifest(pushed) == changed
    assert not any(e.method == "GET" and "/manifests/moving" in e.path for e in plain_reg.access_log())


def test_tampered_layout_blob(images, tmp_path) -> None:
    img: BuiltImage = images["single"]
    copy = tmp_path / "copy"
    shutil.copytree(img.path, copy)
    src = open_source(f"oci:{copy}:v1")
    [info] = select_manifests(src)
    layer = info.manifest.layers[1]
    blob = copy / "blobs" / "sha256" / digest.hex_part(layer.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    it = src.open_blob(layer)
    with pytest.raises(DigestError, match="digest mismatch"):
        for _ in it:
            pass
    # A manifest whose bytes changed is caught too.
    top = src.resolve()
    mpath = copy / "blobs" / "sha256" / digest.hex_part(top.digest)
    mpath.write_bytes(mpath.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    with pytest.raises(DigestError):
        src.fetch_manifest(top)


def test_tampered_registry_blob(images, tmp_path) -> None:
    img: BuiltImage = images["single"]
    with LocalRegistry() as reg:
        reg.push_oci_layout(img.path, "t/x:v1", tag="v1")
        src = open_source(f"{reg.host}/t/x:v1", reg.source_options())
        [info] = select_manifests(src)
        layer = info.manifest.layers[0]
        assert reg.dir is not None
        [data_file] = (reg.dir / "storage").rglob(f"blobs/sha256/*/{digest.hex_part(layer.digest)}/data")
        raw = bytearray(data_file.read_bytes())
        raw[-1] ^= 0x01
        data_file.write_bytes(bytes(raw))
        with pytest.raises(DigestError, match="digest mismatch"):
            src.read_blob(layer)


def test_auth_and_tls_errors(tls_reg) -> None:
    ref = f"{tls_reg.host}/demo/single:v1"
    with pytest.raises(RegistryError) as ei:
        open_source(ref, tls_reg.source_options(user="tester:wrong-password")).resolve()
    msg = str(ei.value)
    assert "authentication failed" in msg and "HTTP 401" in msg and tls_reg.host in msg
    assert "wrong-password" not in msg and "\n" not in msg

    with pytest.raises(RegistryError, match="no credentials"):
        open_source(ref, tls_reg.source_options(user=None)).resolve()

    # The test CA is in no trust store: without ca_file verification must fail...
    with pytest.raises(RegistryError, match="TLS"):
        open_source(ref, tls_reg.source_options(ca_file=None)).resolve()
    # ...and skip_verify accepts it.
    assert open_source(ref, tls_reg.source_options(ca_file=None, skip_verify=True)).resolve().size > 0
    with pytest.raises(RegistryError, match="CA file"):
        open_source(ref, tls_reg.source_options(ca_file="/nonexistent/ca.pem"))


def test_not_found(plain_reg, images, tmp_path) -> None:
    opts = plain_reg.source_options()
    with pytest.raises(NotFound) as ei:
        open_source(f"{plain_reg.host}/demo/single:nope", opts).resolve()
    msg = str(ei.value)
    assert "demo/single:nope" in msg and "404" in msg and plain_reg.host in msg and "\n" not in msg
    with pytest.raises(NotFound, match="demo/absent"):
        open_source(f"{plain_reg.host}/demo/absent:v1", opts).resolve()
    src = open_source(f"{plain_reg.host}/demo/single:v1", opts)
    missing = Descriptor(mt.OCI_LAYER_GZIP, "sha256:" + "0" * 64, 10)
    with pytest.raises(NotFound, match="blob"):
        src.open_blob(missing)
    with pytest.raises(NotFound, match="tags: v1"):
        open_source(f"oci:{images['single'].path}:nope").resolve()
    with pytest.raises(NotFound):
        open_source(f"oci:{tmp_path / 'nowhere'}")
    with pytest.raises(NotFound):
        open_source(f"oci-archive:{tmp_path / 'nowhere.tar'}")
    (tmp_path / "not-a-layout").mkdir()
    with pytest.raises(ReferenceError_, match="not an OCI layout"):
        open_source(f"oci:{tmp_path / 'not-a-layout'}")
    with pytest.raises(ReferenceError_):
        open_source("Not A Ref")
    # Archives are read-only.
    with pytest.raises(ReferenceError_, match="read-only"):
        open_source(f"oci-archive:{images['base'] / 'single.tar'}").push_manifest(b"{}", mt.OCI_MANIFEST)


def _artifact(tag_note: str) -> tuple[bytes, bytes, ImageManifest]:
    cfg = b"{}"
    layer = (b"soci-helper test layer " + tag_note.encode()) * 1000
    m = ImageManifest(
        config=Descriptor(mt.OCI_EMPTY, digest.of_bytes(cfg), len(cfg)),
        layers=[Descriptor("application/octet-stream", digest.of_bytes(layer), len(layer),
                           annotations={"note": tag_note})],
        artifact_type="application/vnd.example.test+json",
        annotations={"org.example": "x"},
    )
    return cfg, layer, m


def _write_and_read_back(target: ImageSource, reopen: ImageSource, tmp_path: Path, note: str) -> None:
    cfg, layer, m = _artifact(note)
    target.push_blob(m.config, cfg)
    layer_file = tmp_path / f"layer-{note}"
    layer_file.write_bytes(layer)
    target.push_blob(m.layers[0], layer_file)  # from a path
    target.push_blob(m.layers[0], layer)  # again: already present, no error
    data = m.to_bytes()
    desc = target.push_manifest(data, mt.OCI_MANIFEST, tag="w1")
    assert desc.digest == digest.of_bytes(data) and desc.size == len(data)
    top = reopen.resolve()
    assert top.digest == desc.digest
    back = parse_image_manifest(reopen.fetch_manifest(top))
    assert back.to_bytes() == data
    assert reopen.read_blob(back.layers[0]) == layer
    assert reopen.read_blob_range(back.layers[0], 5, 10) == layer[5:15]
    # A manifest pushed by digest only.
    _, _, m2 = _artifact(note + "-2")
    target.push_blob(m2.layers[0], _artifact(note + "-2")[1])
    d2 = target.push_manifest(m2.to_bytes(), mt.OCI_MANIFEST)
    assert reopen.fetch_manifest(d2) == m2.to_bytes()


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_push_to_registry(kind: str, request, tmp_path) -> None:
    reg: LocalRegistry = request.getfixturevalue("plain_reg" if kind == "plain" else "tls_reg")
    opts = reg.source_options()
    target = open_source(f"{reg.host}/written/art:ignored", opts)
    _write_and_read_back(target, open_source(f"{reg.host}/written/art:w1", opts), tmp_path, kind)


def test_push_to_oci_dir(plain_reg, tmp_path) -> None:
    out = tmp_path / "out"
    target = open_source(f"oci:{out}", create=True)
    _write_and_read_back(target, open_source(f"oci:{out}:w1"), tmp_path, "dir")
    index = json.loads((out / "index.json").read_text())
    tags = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]
    assert tags.count("w1") == 1 and len(tags) == 2
    # Replacing a tag keeps one entry; skopeo accepts what we wrote.
    cfg, layer, m = _artifact("again")
    target.push_blob(m.config, cfg)
    target.push_blob(m.layers[0], layer)
    d = target.push_manifest(m.to_bytes(), mt.OCI_MANIFEST, tag="w1")
    assert open_source(f"oci:{out}:w1").resolve().digest == d.digest
    plain_reg.push_oci_layout(out, "from-dir/art:w1", tag="w1", all_platforms=False)
    pushed = open_source(f"{plain_reg.host}/from-dir/art:w1", plain_reg.source_options())
    assert pushed.resolve().digest == d.digest
    # No temp files are left behind.
    assert not list(out.rglob(".tmp-*"))
    with pytest.raises(DigestError):
        target.push_blob(Descriptor(mt.OCI_LAYER, "sha256:" + "1" * 64, 3), b"abc")


# --- Bearer tokens and servers that ignore Range, against a small fake registry ---


class _FakeRegistry(BaseHTTPRequestHandler):
    blob = bytes(range(256)) * 40
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
               b'"config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"' \
               + digest.of_bytes(b"{}").encode() + b'","size":2},"layers":[]}'
    token_requests: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        port = self.server.server_address[1]
        if self.path.startswith("/token"):
            import base64
            good = "Basic " + base64.b64encode(b"alice:pw").decode()
            if self.headers.get("Authorization") != good:
                self._send(401)
                return
            self.token_requests.append(self.path)
            self._send(200, json.dumps({"token": "tok-123", "expires_in": 300}).encode(),
                       {"Content-Type": "application/json"})
            return
        if self.headers.get("Authorization") != "Bearer tok-123":
            scope = "repository:lib/app:pull"
            self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}', {
                "WWW-Authenticate": f'Bearer realm="http://127.0.0.1:{port}/token",'
                                    f'service="fake",scope="{scope}"'})
            return
        if self.path == "/v2/lib/app/manifests/v1":
            self._send(200, self.manifest, {"Content-Type": mt.OCI_MANIFEST})
        elif self.path == f"/v2/lib/app/blobs/{digest.of_bytes(self.blob)}":
            self._send(200, self.blob)  # ignores Range on purpose
        else:
            self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')

    do_HEAD = do_GET


@pytest.fixture()
def fake_registry() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _FakeRegistry.token_requests = []
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_bearer_token_flow_and_200_range(fake_registry: str) -> None:
    opts = RegistryOptions(plain_http=True, credentials=Credentials("alice", "pw"))
    with RegistryClient(fake_registry, opts) as c:
        data, desc = c.get_manifest("lib/app", "v1")
        assert desc.digest == digest.of_bytes(data) and desc.media_type == mt.OCI_MANIFEST
        blob = _FakeRegistry.blob
        d = digest.of_bytes(blob)
        assert c.get_blob("lib/app", d, len(blob)) == blob
        assert c.get_blob_range("lib/app", d, 1000, 300) == blob[1000:1300]
        assert c.get_blob_range("lib/app", d, len(blob) - 5, 50) == blob[-5:]
        # One token for the pull scope, reused for every later request.
        assert len(_FakeRegistry.token_requests) == 1
        assert "scope=repository%3Alib%2Fapp%3Apull" in _FakeRegistry.token_requests[0]
        assert "service=fake" in _FakeRegistry.token_requests[0]
        with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
            c.get_manifest("lib/app", "v2")
        with pytest.raises(DigestError):
            c.get_blob("lib/app", d, len(blob) + 1)
    wrong = RegistryOptions(plain_http=True, credentials=Credentials("alice", "hunter2-wrong"))
    with RegistryClient(fake_registry, wrong) as c:
        with pytest.raises(RegistryError) as ei:
            c.get_manifest("lib/app", "v1")
        assert "token service" in str(ei.value) and "hunter2" not in str(ei.value)
    assert issubclass(RegistryError, SociError)


def test_registry_unreachable() -> None:
    src = open_source("127.0.0.1:9/none/such:v1", SourceOptions(plain_http=True))
    with pytest.raises(RegistryError, match="cannot connect"):
        src.resolve()


def test_client_calls(plain_reg, tls_reg, images) -> None:
    from soci_helper.oci.registry import get_client

    img: BuiltImage = images["single"]
    c = get_client(plain_reg.host, RegistryOptions(plain_http=True))
    assert get_client(plain_reg.host, RegistryOptions(plain_http=True)) is c  # one session, reused
    c.ping()
    head = c.head_manifest("demo/single", "v1")
    assert head is not None and head.digest == img.top_digest and head.media_type == mt.OCI_MANIFEST
    assert c.head_manifest("demo/single", "nope") is None
    layer_digest = next(iter(img.layers))
    assert c.head_blob("demo/single", layer_digest) == len(img.layers[layer_digest])
    assert c.head_blob("demo/single", "sha256:" + "3" * 64) is None
    with pytest.raises(DigestError):
        c.put_manifest(
            "demo/single", "sha256:" + "4" * 64, b"{}", mt.OCI_MANIFEST)
    with pytest.raises(RegistryError, match="range not satisfiable|beyond"):
        c.get_blob_range("demo/single", layer_digest, 10**9, 10)
    creds = Credentials(tls_reg.user, tls_reg.password)
    t = get_client(tls_reg.host, RegistryOptions(ca_file=tls_reg.ca_file, credentials=creds))
    t.ping()
    assert t.head_manifest("demo/single", "v1") is not None
