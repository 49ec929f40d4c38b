"""`soci push` and SOCI index discovery (`soci index pull`) against a real registry, with and without referrers API."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from support.cli import one_error_line, soci
from support.layers import edge_case_layer, real_files_layer
from support.registry import LocalRegistry, build_multiplatform_image

from soci_helper.errors import DigestError, NotFound, SociError
from soci_helper.index import soci_index as si
from soci_helper.index.discover import choose_index, discover
from soci_helper.index.ops import Store
from soci_helper.index.push import add_referrer, push
from soci_helper.oci.registry import RegistryClient, RegistryOptions
from soci_helper.oci.source import SourceOptions
from soci_helper.sandbox.images import write_image
from soci_helper.store.artifacts import TYPE_INDEX

SPANS = (1 << 20, 1 << 19)
MIN = 100_000
OPTS = SourceOptions(plain_http=True)
SIG_TYPE = "application/vnd.example.signature.v1+json"


# --- helpers -------------------------------------------------------------------------------------


def curl(url: str) -> bytes:
    accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    return subprocess.run(["curl", "-sSf", "-H", f"Accept: {accept}", url], check=True, capture_output=True,
                          timeout=30).stdout


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tag_of(digest: str) -> str:
    return "sha256-" + digest[7:]


def blob_file(reg: LocalRegistry, digest: str) -> Path:
    assert reg.dir is not None
    h = digest[7:]
    return reg.dir / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256" / h[:2] / h / "data"


class ReferrersProxy:
    """A loopback front for the registry that adds a referrers API serving `self.referrers[digest]`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.referrers: dict[str, list[dict[str, Any]]] = {}
        self.hits: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _forward(self) -> None:
                path = self.path.split("?", 1)[0]
                parts = path.split("/referrers/")
                if len(parts) == 2 and self.command == "GET":
                    proxy.hits.append(self.path)
                    body = si.go_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                       "manifests": proxy.referrers.get(parts[1], [])})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
                r = requests.request(self.command, proxy.upstream + self.path, headers=headers, data=data,
                                     allow_redirects=False, stream=True, timeout=30)
                body = b"" if self.command == "HEAD" else r.raw.read(decode_content=False)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", r.headers.get("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)
                r.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ReferrersProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("image")
    desc = write_image(d / "layout", [(real_files_layer(d / "real.tar"), "gzip"),
                                      (edge_case_layer(d / "edge.tar"), "pigz")], "v1")
    return {"layout": d / "layout", "digest": desc.digest}


@pytest.fixture(scope="module")
def client(registry):
    c = RegistryClient(registry.host, RegistryOptions(plain_http=True))
    yield c
    c.close()


@pytest.fixture(scope="module")
def repo(registry, image):
    """Push the test image to a fresh repository: repo("name") -> full reference `HOST/test/name:v1`."""

    def make(name: str) -> str:
        return registry.push_oci_layout(image["layout"], f"test/{name}:v1", tag="v1")

    return make


@pytest.fixture(scope="module")
def built(tmp_path_factory, registry, image):
    """Two store roots, each holding a v1 index of the image built with its own span size."""
    src = registry.push_oci_layout(image["layout"], "test/src:v1", tag="v1")
    out = []
    for span in SPANS:
        root = tmp_path_factory.mktemp(f"root{span}")
        soci(root, "create", "--plain-http", "--span-size", str(span), "--min-layer-size", str(MIN), src)
        store = Store.open(str(root))
        try:
            (entry,) = store.db.indexes(image["digest"])
            index = store.load_index(entry.digest)
        finally:
            store.close()
        out.append({"root": root, "digest": entry.digest, "index": index,
                    "raw": (root / "content" / "blobs" / "sha256" / entry.digest[7:]).read_bytes()})
    assert out[0]["digest"] != out[1]["digest"] and len(out[0]["index"].ztocs) == 2
    return out


def _store(root: Path) -> Store:
    return Store.open(str(root))


def _push(root: Path, ref: str, existing: str = "warn", opts: SourceOptions = OPTS) -> list[str]:
    lines: list[str] = []
    store = _store(root)
    try:
        push(ref, store, opts, existing, lambda _k, t: lines.append(t), lambda d, s: lines.append(f"{s} {d['digest']}"))
    finally:
        store.close()
    return lines


def _discover(root: Path, ref: str, explicit: str | None = None, opts: SourceOptions = OPTS):
    store = _store(root)
    try:
        return discover(ref, opts, store, explicit)
    finally:
        store.close()


def _expected_referrer(b: dict[str, Any]) -> dict[str, Any]:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": b["digest"],
        "size": len(b["raw"]),
        "annotations": {"com.amazon.soci.build-tool-identifier": b["index"].build_tool},
        "artifactType": "application/vnd.amazon.soci.index.v1+json",
    }


def _fake_signature(client: RegistryClient, ref: str, image_digest: str, size: int) -> bytes:
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    client.push_blob(repo, si.EMPTY_CONFIG_DIGEST, 2, si.EMPTY_CONFIG)
    sig = si.go_json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "artifactType": SIG_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": si.EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": si.EMPTY_CONFIG_DIGEST, "size": 2}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image_digest, "size": size},
        "annotations": {"org.example.signer": "tester"},
    })
    client.put_manifest(repo, sha(sig), sig,
                        "application/vnd.oci.image.manifest.v1+json")
    assert add_referrer(client, repo, image_digest, sig)
    return sig


def _image_size(client: RegistryClient, ref: str) -> int:
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    return client.get_manifest(repo, "v1")[1].size


# --- tests ---------------------------------------------------------------------------------------


def test_push_writes_referrers_tag_and_index_as_specified(registry, image, built, repo, client):
    ref = repo("a")
    b = built[0]
    r = soci(b["root"], "push", "--plain-http", ref)
    lines = r.stdout.splitlines()
    assert "checking if a soci index already exists in remote repository..." in lines
    assert f"pushing soci index with digest: {b['digest']}" in lines
    ztocs = [z.digest for z in b["index"].ztocs]
    for d in [*ztocs, si.EMPTY_CONFIG_DIGEST, b["digest"]]:
        assert f"successfully pushed artifact with digest: {d}" in lines, r.stdout
    base = f"{registry.url}/v2/test/a"
    want = si.go_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [_expected_referrer(b)]})
    assert curl(f"{base}/manifests/{tag_of(image['digest'])}") == want
    sk = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                         f"docker://{registry.host}/test/a:{tag_of(image['digest'])}"],
                        capture_output=True, check=True, timeout=60).stdout
    assert json.loads(sk) == json.loads(want)
    doc = json.loads(curl(f"{base}/manifests/{b['digest']}"))
    assert curl(f"{base}/manifests/{b['digest']}") == b["raw"]
    assert doc["subject"] == {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image["digest"],
                              "size": _image_size(client, ref)}
    assert doc["config"] == {"mediaType": si.ARTIFACT_TYPE_V1, "digest": si.EMPTY_CONFIG_DIGEST, "size": 2}
    assert [x["digest"] for x in doc["layers"]] == ztocs
    assert all(set(x["annotations"]) == {si.ANNOTATION_LAYER_DIGEST, si.ANNOTATION_LAYER_MEDIA_TYPE,
                                         si.ANNOTATION_SPAN_SIZE} for x in doc["layers"])
    assert list(doc["annotations"]) == [si.ANNOTATION_BUILD_TOOL]
    for z in ztocs:
        got = requests.get(f"{base}/blobs/{z}", timeout=10).content
        assert got == (b["root"] / "content" / "blobs" / "sha256" / z[7:]).read_bytes()
    assert requests.get(f"{base}/blobs/{si.EMPTY_CONFIG_DIGEST}", timeout=10).content == b"{}"


def test_push_twice_is_idempotent_and_keeps_other_referrers(registry, image, built, repo, client):
    ref = repo("b")
    sig = _fake_signature(client, ref, image["digest"], _image_size(client, ref))
    sig_only = client.head_manifest("test/b", tag_of(image["digest"]))
    assert sig_only is not None
    b = built[0]
    _push(b["root"], ref)
    before = len(registry.access_log())
    again = _push(b["root"], ref, "allow")
    # Second time: every blob and the manifest exist, nothing is uploaded and the tag is left alone.
    assert all(ln.startswith("skipped ") for ln in again if ln.startswith(("pushing ", "pushed ", "skipped ")))
    assert not [e for e in registry.access_log()[before:] if e.method in ("PUT", "POST", "PATCH")]
    tag = json.loads(curl(f"{registry.url}/v2/test/b/manifests/{tag_of(image['digest'])}"))
    assert [m["digest"] for m in tag["manifests"]] == [sha(sig),
                                                       b["digest"]]
    assert tag["manifests"][0]["artifactType"] == SIG_TYPE
    assert tag["manifests"][0]["annotations"] == {"org.example.signer": "tester"}
    assert tag["manifests"][1] == _expected_referrer(b)
    # The replaced tag index was deleted, as ORAS does, so repeated pushes leave no garbage.
    assert client.head_manifest("test/b", sig_only.digest) is None


def test_existing_index_policies(registry, image, built, repo):
    ref = repo("c")
    first, second = built
    lines = _push(first["root"], ref, "skip")
    assert any(ln == "checking if a soci index already exists in remote repository..." for ln in lines)
    assert f"pushed {first['digest']}" in lines

    # skip: the registry already has an index, nothing of the second one is pushed.
    r = soci(second["root"], "push", "--plain-http", "--existing-index", "skip", ref)
    assert (f"soci index found in remote repository with digest: {first['digest']}: skipping pushing artifacts "
            f"for image manifest: {image['digest']}") in r.stdout.splitlines()
    assert second["digest"] not in r.stdout
    assert requests.head(f"{registry.url}/v2/test/c/manifests/{second['digest']}", timeout=10).status_code == 404

    # warn (the default): says so, pushes anyway.
    r = soci(second["root"], "push", "--plain-http", ref)
    assert (f"[WARN] soci index found in remote repository with digest: {first['digest']}: pushing index anyway"
            in r.stdout.splitlines())
    assert f"successfully pushed artifact with digest: {second['digest']}" in r.stdout
    tag = json.loads(curl(f"{registry.url}/v2/test/c/manifests/{tag_of(image['digest'])}"))
    assert [m["digest"] for m in tag["manifests"]] == [first["digest"], second["digest"]]

    r = soci(first["root"], "push", "--plain-http", "--existing-index", "warn", ref)
    assert "[WARN] multiple soci indices found in remote repository: pushing index anyway" in r.stdout
    r = soci(first["root"], "push", "--plain-http", "--existing-index", "skip", "-q", ref)
    assert r.stdout == ""
    # allow: does not even look; quiet prints the digest only.
    lines = _push(first["root"], ref, "allow")
    assert not [ln for ln in lines if "checking" in ln or "found" in ln]
    r = soci(first["root"], "push", "--plain-http", "--existing-index", "allow", "-q", ref)
    assert r.stdout.splitlines() == [first["digest"]]
    with pytest.raises(SociError, match="existing-index"):
        _push(first["root"], ref, "bogus")


def test_discovery_via_referrers_tag_on_a_fresh_store(tmp_path, registry, image, built, repo):
    ref = repo("d")
    b = built[0]
    _push(b["root"], ref)
    r = soci(tmp_path, "index", "pull", "--plain-http", ref)
    assert r.stdout.strip() == (f"pulled soci index {b['digest']} (v1, found via referrers tag) for image manifest "
                                f"{image['digest']}: 2 ztocs")
    for z in b["index"].ztocs:
        assert (tmp_path / "content" / "blobs" / "sha256" / z.digest[7:]).read_bytes() == (
            b["root"] / "content" / "blobs" / "sha256" / z.digest[7:]).read_bytes()
    assert (tmp_path / "content" / "blobs" / "sha256" / b["digest"][7:]).read_bytes() == b["raw"]
    store = _store(tmp_path)
    try:
        (entry,) = store.db.indexes(image["digest"])
        assert (entry.digest, entry.image_ref, entry.artifact_type) == (b["digest"], ref, si.ARTIFACT_TYPE_V1)
        assert entry.platform and entry.type == TYPE_INDEX
        for z in b["index"].ztocs:
            ze = store.db.get(z.digest)
            assert ze is not None and (ze.original_digest, ze.span_size, ze.image_ref) == (z.layer_digest, SPANS[0],
                                                                                            ref)
    finally:
        store.close()
    # Nothing left half-written.
    assert list((tmp_path / "content" / "ingest").iterdir()) == []
    # The fetched index pushes back unchanged from the new store (it is a complete local index).
    assert _push(tmp_path, ref, "allow")[-1] == f"skipped {b['digest']}"


def test_discovery_of_converted_image_by_annotation(tmp_path, registry, repo):
    src = repo("e-src")
    dst = f"{registry.host}/test/e:v2"
    soci(tmp_path / "conv", "convert", "--plain-http", "--span-size", str(SPANS[0]), "--min-layer-size", str(MIN),
         src, dst)
    found = _discover(tmp_path / "fresh", dst)
    assert found.found_via == "index-digest annotation" and found.index.version == "v2"
    assert found.index.subject is None and len(found.ztocs) == 2
    man = json.loads(curl(f"{registry.url}/v2/test/e/manifests/{found.image_digest}"))
    assert man["annotations"][si.ANNOTATION_INDEX_DIGEST] == found.digest
    store = _store(tmp_path / "fresh")
    try:
        assert [e.digest for e in store.db.indexes(found.image_digest)] == [found.digest]
        assert all(store.content.has(z) for z in found.ztocs)
    finally:
        store.close()


def test_several_v1_indexes_choice_is_deterministic_and_explicit_digest_wins(tmp_path, registry, image, built, repo,
                                                                               client):
    ref = repo("h")
    for b in built:
        _push(b["root"], ref, "allow")
    greatest, other = sorted(built, key=lambda b: b["digest"], reverse=True)
    found = _discover(tmp_path / "r1", ref)
    assert found.digest == greatest["digest"] and found.candidates == 2 and found.found_via == "referrers tag"

    found = _discover(tmp_path / "r2", ref, explicit=other["digest"])
    assert found.digest == other["digest"] and found.found_via == "explicit digest"
    r = soci(tmp_path / "r3", "index", "pull", "--plain-http", "--soci-index-digest", other["digest"], "-q", ref)
    assert r.stdout.split() == [other["digest"]]

    # An index carrying a creation time beats any without one, whatever its digest.
    doc = json.loads(other["raw"])
    doc["annotations"][si.ANNOTATION_CREATED] = "2024-05-01T10:00:00Z"
    dated = si.go_json(doc)
    dated_digest = sha(dated)
    client.put_manifest("test/h", dated_digest, dated, si.MEDIA_TYPE_OCI_MANIFEST)
    add_referrer(client, "test/h", image["digest"], dated)
    found = _discover(tmp_path / "r4", ref)
    assert found.digest == dated_digest and found.candidates == 3
    newer = {"digest": "sha256:" + "a" * 64, "annotations": {si.ANNOTATION_CREATED: "2024-05-01T22:30:00-02:00"}}
    older = {"digest": "sha256:" + "f" * 64, "annotations": {si.ANNOTATION_CREATED: "2024-05-01T23:00:00Z"}}
    undated = {"digest": "sha256:" + "e" * 64, "annotations": {si.ANNOTATION_CREATED: "yesterday"}}
    for order in ([newer, older, undated], [undated, older, newer]):
        assert choose_index(order) is newer


def test_referrers_api_is_used_before_the_tag(tmp_path, registry, image, built, repo):
    repo("g")
    first, second = built
    _push(first["root"], f"{registry.host}/test/g:v1")
    with ReferrersProxy(registry.url) as proxy:
        via = f"{proxy.host}/test/g:v1"
        sig = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "0" * 64, "size": 5,
               "artifactType": SIG_TYPE}
        proxy.referrers[image["digest"]] = [sig]
        # Through a registry with the API, push leaves the referrers tag alone.
        lines = _push(second["root"], via)
        assert f"pushed {second['digest']}" in lines
        assert any("/referrers/" in h for h in proxy.hits)
        tag = json.loads(curl(f"{registry.url}/v2/test/g/manifests/{tag_of(image['digest'])}"))
        assert [m["digest"] for m in tag["manifests"]] == [first["digest"]]

        proxy.referrers[image["digest"]] = [sig, _expected_referrer(second)]
        found = _discover(tmp_path / "api", via)
        assert found.digest == second["digest"] and found.found_via == "referrers API"
        assert any(f"/referrers/{image['digest']}?artifactType=" in h for h in proxy.hits)
    # The same repository without the API: the tag.
    found = _discover(tmp_path / "tag", f"{registry.host}/test/g:v1")
    assert found.digest == first["digest"] and found.found_via == "referrers tag"


def test_errors_are_one_clear_line(tmp_path, registry, image, built, repo, client):
    ref = repo("i")
    r = soci(tmp_path / "none", "index", "pull", "--plain-http", ref, ok=False)
    line = one_error_line(r)
    assert "no SOCI index" in line and image["digest"] in line
    with pytest.raises(NotFound):
        _discover(tmp_path / "none", ref)
    r = soci(tmp_path / "empty", "push", "--plain-http", ref, ok=False)
    assert "could not find any soci index manifest v1 to push" in one_error_line(r)

    # A zTOC whose bytes in the registry no longer match its digest.
    b = built[0]
    _push(b["root"], ref)
    victim = blob_file(registry, b["index"].ztocs[0].digest)
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        r = soci(tmp_path / "tampered", "index", "pull", "--plain-http", ref, ok=False)
        line = one_error_line(r)
        assert "digest" in line and b["index"].ztocs[0].digest in line
        with pytest.raises(DigestError):
            _discover(tmp_path / "tampered", ref)
        assert not (tmp_path / "tampered" / "content" / "blobs" / "sha256" / b["index"].ztocs[0].digest[7:]).exists()
        store = _store(tmp_path / "tampered")
        try:
            assert store.db.indexes() == []
        finally:
            store.close()
    finally:
        victim.write_bytes(original)

    # A malformed index manifest listed as the image's only SOCI index.
    bad_ref = repo("j")
    client.push_blob("test/j", si.EMPTY_CONFIG_DIGEST, 2, si.EMPTY_CONFIG)
    bad = si.go_json({
        "schemaVersion": 2, "mediaType": si.MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": si.ARTIFACT_TYPE_V1, "digest": si.EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": [{"mediaType": si.ZTOC_MEDIA_TYPE, "digest": si.EMPTY_CONFIG_DIGEST, "size": 2}],
        "subject": {"mediaType": si.MEDIA_TYPE_OCI_MANIFEST, "digest": image["digest"],
                    "size": _image_size(client, bad_ref)},
    })
    client.put_manifest("test/j", sha(bad), bad,
                        si.MEDIA_TYPE_OCI_MANIFEST)
    add_referrer(client, "test/j", image["digest"], bad)
    r = soci(tmp_path / "bad", "index", "pull", "--plain-http", bad_ref, ok=False)
    assert "zTOC descriptor 0 is invalid" in one_error_line(r)

    # Pushing an image that is not in the registry names it.
    r = soci(b["root"], "push", "--plain-http", f"{registry.host}/test/missing:v1", ok=False)
    assert "test/missing" in one_error_line(r)


def test_multi_platform_push_and_discovery_per_platform(tmp_path, registry):
    img = build_multiplatform_image(tmp_path / "mp", tag="v1", platforms=["linux/amd64", "linux/arm64/v8"])
    ref = registry.push_oci_layout(tmp_path / "mp", "test/mp:v1", tag="v1")
    root = tmp_path / "root"
    soci(root, "create", "--plain-http", "--all-platforms", "--min-layer-size", "0", ref)
    r = soci(root, "push", "--plain-http", "--all-platforms", "-q", ref)
    pushed = r.stdout.split()
    assert len(pushed) == 2
    for plat, manifest in img.manifests.items():
        tag = json.loads(curl(f"{registry.url}/v2/test/mp/manifests/{tag_of(manifest)}"))
        (listed,) = tag["manifests"]
        assert listed["digest"] in pushed
        fresh = tmp_path / plat.replace("/", "-")
        r = soci(fresh, "index", "pull", "--plain-http", "-p", plat, ref)
        assert f"for image manifest {manifest}: 2 ztocs" in r.stdout and listed["digest"] in r.stdout
        store = _store(fresh)
        try:
            (entry,) = store.db.indexes()
            assert entry.platform == plat and entry.original_digest == manifest
        finally:
            store.close()
    # One platform only: the other's index is not touched.
    r = soci(root, "push", "--plain-http", "-p", "linux/arm64/v8", "--existing-index", "skip", ref)
    assert r.stdout.count("skipping pushing artifacts") == 1


def test_discovery_for_a_mount_leaves_the_entries_to_the_mount(tmp_path, registry, image, built, repo, client):
    """A zTOC whose header is sound but whose entries are not: `soci index pull` refuses it in one line;
    discovery for a mount (check_entries=False) takes it, as the layer server checks entries when it builds
    its table. A blob that is no zTOC at all is refused either way."""
    from soci_helper.ztoc import codec

    ref = repo("k")
    name = "test/k"
    b = built[0]
    good = b["index"].ztocs[0]
    store = _store(b["root"])
    try:
        ztoc = codec.decode(store.content.read(good.digest))
    finally:
        store.close()
    victim = next(f for f in ztoc.files if f.type == "reg" and f.uncompressed_size)
    victim.uncompressed_offset = ztoc.uncompressed_archive_size + 1  # data outside the archive
    bad_entries = codec.encode(ztoc)
    not_a_ztoc = b'{"this": "is json"}'
    client.push_blob(name, si.EMPTY_CONFIG_DIGEST, 2, si.EMPTY_CONFIG)

    def publish(blob: bytes) -> str:
        digest = sha(blob)
        client.push_blob(name, digest, len(blob), blob)
        z = si.ZtocRef(digest, len(blob), good.layer_digest, good.layer_media_type, good.span_size)
        index = si.SociIndex(si.ARTIFACT_TYPE_V1, [z], b["index"].build_tool,
                             subject={"mediaType": si.MEDIA_TYPE_OCI_MANIFEST, "digest": image["digest"],
                                      "size": _image_size(client, ref)})
        raw = si.serialize(index)
        client.put_manifest(name, sha(raw), raw, si.MEDIA_TYPE_OCI_MANIFEST)
        assert add_referrer(client, name, image["digest"], raw)
        return sha(raw)

    explicit = publish(bad_entries)
    r = soci(tmp_path / "pull", "index", "pull", "--plain-http", "--soci-index-digest", explicit, ref, ok=False)
    assert "lies outside the archive" in one_error_line(r)
    store = _store(tmp_path / "mount")
    try:
        found = discover(ref, OPTS, store, explicit, check_entries=False)
        assert found.digest == explicit and store.content.has(sha(bad_entries))
        with pytest.raises(SociError, match="lies outside the archive"):
            codec.decode(store.content.read(sha(bad_entries)))
        junk = publish(not_a_ztoc)
        with pytest.raises(SociError, match=sha(not_a_ztoc)):
            discover(ref, OPTS, store, junk, check_entries=False)
        assert not store.content.has(sha(not_a_ztoc))
    finally:
        store.close()
