"""Pure OCI pieces without a registry: references, platforms, docker config, media types, manifests."""

from __future__ import annotations

import base64
import json

import pytest

from soci_helper import digest
from soci_helper.errors import DigestError, ReferenceError_
from soci_helper.oci import auth
from soci_helper.oci import mediatype as mt
from soci_helper.oci.manifest import (
    Descriptor,
    ImageIndex,
    ImageManifest,
    ManifestError,
    canonical_json,
    parse_image_manifest,
    parse_index,
    parse_manifest,
)
from soci_helper.oci.platform import Platform, host_platform, match_rank, matches, normalize, parse_platform
from soci_helper.oci.reference import Reference, familiar_name, parse_reference

D = "sha256:" + "ab" * 32


# --- references ---------------------------------------------------------------

@pytest.mark.parametrize(
    "text, registry, repo, tag, dig",
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu:1", "docker.io", "library/ubuntu", "1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000", "app", "v1", None),
        ("ghcr.io/org/app@" + D, "ghcr.io", "org/app", None, D),
        ("ghcr.io/org/app:v2@" + D, "ghcr.io", "org/app", "v2", D),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("example.com/a.b_c__d-e---f", "example.com", "a.b_c__d-e---f", "latest", None),
        ("docker://quay.io/x/y:z", "quay.io", "x/y", "z", None),
    ],
)
def test_parse_reference(text: str, registry: str, repo: str, tag: str | None, dig: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, dig)


def test_reference_helpers() -> None:
    ref = parse_reference("ubuntu:22.04")
    assert str(ref) == "docker.io/library/ubuntu:22.04"
    assert ref.api_host == "registry-1.docker.io"
    assert ref.object == "22.04"
    assert familiar_name(ref) == "ubuntu:22.04"
    pinned = ref.with_digest(D)
    assert pinned.object == D and str(pinned).endswith("@" + D)
    assert parse_reference("127.0.0.1:5000/app").api_host == "127.0.0.1:5000"
    assert Reference("r.io", "a").object == "latest"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("UPPER/app", "lowercase"),  # an upper-case first component is a host, then app is fine...
        ("app:bad tag", "whitespace"),
        ("app@sha256:1234", "bad digest"),
        ("app@md5:" + "a" * 32, "bad digest"),
        ("app:-x", "bad tag"),
        ("host:5000/", "no repository"),
        ("example.com/App", "lowercase"),
        ("example.com/a//b", "bad repository component"),
        ("ab" * 32, "64-character hex"),
        ("https://example.com/app", "URL scheme"),
        ("bad_host.com:99999x/app", "bad registry host"),
        ("example.com/" + "a" * 300, "longer than"),
    ],
)
def test_parse_reference_errors(text: str, fragment: str) -> None:
    if text == "UPPER/app":
        # Docker treats an upper-case first component as a registry host.
        assert parse_reference(text).registry == "upper"
        return
    with pytest.raises(ReferenceError_) as ei:
        parse_reference(text)
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg


# --- platforms ----------------------------------------------------------------

def test_parse_and_normalize_platform() -> None:
    assert str(parse_platform("linux/amd64")) == "linux/amd64"
    assert parse_platform("linux/x86_64") == Platform("linux", "amd64")
    assert parse_platform("linux/aarch64") == Platform("linux", "arm64")
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64")
    assert parse_platform("linux/arm") == Platform("linux", "arm", "v7")
    assert parse_platform("linux/armhf") == Platform("linux", "arm", "v7")
    assert parse_platform("linux/i686") == Platform("linux", "386")
    assert normalize(Platform("macos", "amd64", "v1")) == Platform("darwin", "amd64")
    assert parse_platform("linux").os == "linux"
    for bad in ("", "linux/", "/amd64", "a/b/c/d"):
        with pytest.raises(ReferenceError_):
            parse_platform(bad)


def test_host_platform() -> None:
    h = host_platform()
    assert h.os == "linux"
    assert h.architecture in ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64")
    if h.architecture == "arm64":
        assert h.variant == "v8"
    assert matches(h, h)


def test_platform_matching() -> None:
    arm64 = parse_platform("linux/arm64")
    assert matches(arm64, Platform("linux", "arm64", "v8"))
    assert matches(Platform("linux", "arm64", "v8"), Platform("linux", "arm64"))
    assert not matches(arm64, Platform("linux", "amd64"))
    assert not matches(arm64, Platform("windows", "arm64"))
    assert not matches(arm64, None)
    v7 = parse_platform("linux/arm/v7")
    assert match_rank(v7, Platform("linux", "arm", "v7")) == 0
    assert match_rank(v7, Platform("linux", "arm", "v6")) == 1
    assert not matches(parse_platform("linux/arm/v6"), Platform("linux", "arm", "v7"))
    assert matches(parse_platform("linux/amd64/v3"), Platform("linux", "amd64"))
    assert not matches(parse_platform("linux/amd64"), Platform("linux", "amd64", "v3"))
    assert Platform("linux", "arm", "v7").to_json() == {"architecture": "arm", "os": "linux", "variant": "v7"}


# --- docker config ------------------------------------------------------------

def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_docker_config_auths(tmp_path, monkeypatch) -> None:
    cfg = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": _b64("hubuser:hub:pw")},
            "http://reg.example.com:5000/v2/": {"username": "u2", "password": "p2"},
            "plain.example.com": {"auth": _b64("u3:p3")},
            "tok.example.com": {"identitytoken": "refresh"},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert auth.docker_config_path() == tmp_path / "config.json"
    hub = auth.lookup_credentials("docker.io")
    assert hub is not None and (hub.username, hub.password) == ("hubuser", "hub:pw")
    assert auth.lookup_credentials("registry-1.docker.io") == hub
    c2 = auth.lookup_credentials("reg.example.com:5000")
    assert c2 is not None and (c2.username, c2.password) == ("u2", "p2")
    c3 = auth.lookup_credentials("plain.example.com")
    assert c3 is not None and c3.password == "p3"
    tok = auth.lookup_credentials("tok.example.com")
    assert tok is not None and tok.identity_token == "refresh"
    assert auth.lookup_credentials("other.example.com") is None
    # Secrets never show up in repr/str.
    assert "hub:pw" not in repr(hub) and "hub:pw" not in str(hub)
    # Explicit --user wins.
    explicit = auth.resolve_credentials("docker.io", "me:secret")
    assert explicit is not None and explicit.username == "me"


def test_docker_config_missing_and_corrupt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert auth.lookup_credentials("docker.io") is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ReferenceError_, match="not valid JSON"):
        auth.lookup_credentials("docker.io")
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"x.io": {"auth": _b64("nocolon")}}}))
    with pytest.raises(ReferenceError_) as ei:
        auth.lookup_credentials("x.io")
    assert "nocolon" not in str(ei.value)


def test_default_config_path(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth.docker_config_path() == tmp_path / ".docker" / "config.json"


def test_credential_helper_hook() -> None:
    cfg = {"credHelpers": {"helped.io": "fake"}, "auths": {"helped.io": {"auth": _b64("a:b")}}}
    calls: list[tuple[str, str]] = []

    def runner(helper: str, server: str) -> auth.Credentials | None:
        calls.append((helper, server))
        return auth.Credentials("from-helper", "pw")

    # Without a runner the helper entry is skipped and `auths` used.
    c = auth.lookup_credentials("helped.io", cfg)
    assert c is not None and c.username == "a"
    auth.set_helper_runner(runner)
    try:
        c = auth.lookup_credentials("helped.io", cfg)
        assert c is not None and c.username == "from-helper"
        assert calls == [("fake", "helped.io")]
        store = {"credsStore": "desktop"}
        auth.lookup_credentials("docker.io", store)
        assert calls[-1] == ("desktop", "https://index.docker.io/v1/")
    finally:
        auth.set_helper_runner(None)


def test_parse_user() -> None:
    c = auth.parse_user("bob:pa:ss")
    assert (c.username, c.password) == ("bob", "pa:ss")
    with pytest.raises(ReferenceError_) as ei:
        auth.parse_user("justapassword")
    assert "justapassword" not in str(ei.value)


# --- media types ----------------------------------------------------------------

@pytest.mark.parametrize(
    "media_type, comp",
    [
        (mt.OCI_LAYER_GZIP, mt.Compression.GZIP),
        (mt.OCI_LAYER_ZSTD, mt.Compression.ZSTD),
        (mt.OCI_LAYER, mt.Compression.UNCOMPRESSED),
        (mt.DOCKER_LAYER_GZIP, mt.Compression.GZIP),
        (mt.DOCKER_FOREIGN_LAYER_GZIP, mt.Compression.GZIP),
        (mt.OCI_LAYER_ND_GZIP, mt.Compression.GZIP),
        (mt.OCI_LAYER_ND, mt.Compression.UNCOMPRESSED),
        (mt.DOCKER_LAYER, mt.Compression.UNCOMPRESSED),
        ("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", mt.Compression.UNKNOWN),
        (mt.OCI_CONFIG, mt.Compression.UNKNOWN),
        ("Application/VND.OCI.image.layer.v1.tar+gzip; foo=bar", mt.Compression.GZIP),
    ],
)
def test_layer_compression(media_type: str, comp: mt.Compression) -> None:
    assert mt.layer_compression(media_type) is comp


def test_media_type_predicates() -> None:
    assert mt.is_non_distributable(mt.DOCKER_FOREIGN_LAYER_GZIP)
    assert mt.is_non_distributable(mt.OCI_LAYER_ND_ZSTD)
    assert not mt.is_non_distributable(mt.OCI_LAYER_GZIP)
    assert mt.is_index(mt.DOCKER_MANIFEST_LIST) and mt.is_image_manifest(mt.DOCKER_MANIFEST)
    assert mt.is_layer(mt.DOCKER_LAYER_GZIP) and not mt.is_layer(mt.OCI_CONFIG)


# --- manifests ------------------------------------------------------------------

def _manifest_dict(**over: object) -> dict:
    m = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": D, "size": 10},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": D, "size": 20}],
    }
    m.update(over)
    return m


def test_canonical_manifest_bytes_match_go_layout() -> None:
    subject = Descriptor(mt.OCI_MANIFEST, D, 5)
    m = ImageManifest(
        config=Descriptor(mt.SOCI_INDEX_V1, "sha256:" + "44" * 32, 2),
        layers=[Descriptor("application/octet-stream", D, 7,
                           annotations={"z": "1", "a": "<&>"})],
        artifact_type=mt.SOCI_INDEX_V1,
        subject=subject,
        annotations={"k": "v"},
    )
    want = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"artifactType":"application/vnd.amazon.soci.index.v1+json",'
        '"config":{"mediaType":"application/vnd.amazon.soci.index.v1+json","digest":"sha256:' + "44" * 32
        + '","size":2},'
        '"layers":[{"mediaType":"application/octet-stream","digest":"' + D + '","size":7,'
        '"annotations":{"a":"\\u003c\\u0026\\u003e","z":"1"}}],'
        '"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"' + D + '","size":5},'
        '"annotations":{"k":"v"}}'
    )
    assert m.to_bytes().decode() == want
    back = parse_image_manifest(m.to_bytes())
    assert back.to_bytes() == m.to_bytes()
    assert m.descriptor().digest == digest.of_bytes(m.to_bytes())


def test_descriptor_field_order_and_roundtrip() -> None:
    d = Descriptor(mt.OCI_MANIFEST, D, 3, annotations={"b": "2", "a": "1"},
                   platform=Platform("linux", "arm64", "v8"), artifact_type=mt.SOCI_INDEX_V2,
                   urls=["https://x"])
    j = d.to_json()
    assert list(j) == ["mediaType", "digest", "size", "urls", "annotations", "platform", "artifactType"]
    assert list(j["platform"]) == ["architecture", "os", "variant"]
    assert Descriptor.from_json(json.loads(canonical_json(j))) == d
    idx = ImageIndex(manifests=[d])
    assert list(idx.to_json()) == ["schemaVersion", "mediaType", "manifests"]
    assert parse_index(idx.to_bytes()).manifests == [d]


def test_canonical_json_escapes_like_go() -> None:
    assert canonical_json({"a": "é\u2028\n"}) == '{"a":"é\\u2028\\n"}'.encode()


@pytest.mark.parametrize(
    "obj, exc, fragment",
    [
        (_manifest_dict(schemaVersion=1), ManifestError, "schema 1"),
        (_manifest_dict(schemaVersion=3), ManifestError, "schemaVersion"),
        ({k: v for k, v in _manifest_dict().items() if k != "config"}, ManifestError, "config"),
        (_manifest_dict(layers={}), ManifestError, "layers"),
        (_manifest_dict(config={"mediaType": mt.OCI_CONFIG, "digest": "sha256:xyz", "size": 1}),
         DigestError, "invalid digest"),
        (_manifest_dict(config={"mediaType": mt.OCI_CONFIG, "digest": D, "size": -1}),
         ManifestError, "negative size"),
        (_manifest_dict(config={"mediaType": mt.OCI_CONFIG, "digest": D, "size": True}),
         ManifestError, "wrong type"),
        (_manifest_dict(config={"digest": D, "size": 1}), ManifestError, "mediaType"),
        (_manifest_dict(mediaType=mt.OCI_INDEX), ManifestError, "unexpected mediaType"),
        (_manifest_dict(annotations={"a": 1}), ManifestError, "annotations"),
    ],
)
def test_manifest_validation(obj: dict, exc: type, fragment: str) -> None:
    with pytest.raises(exc) as ei:
        parse_image_manifest(json.dumps(obj).encode())
    assert fragment in str(ei.value)


def test_parse_manifest_dispatch_and_errors() -> None:
    assert isinstance(parse_manifest(json.dumps(_manifest_dict()).encode()), ImageManifest)
    docker = _manifest_dict(mediaType=mt.DOCKER_MANIFEST)
    assert isinstance(parse_manifest(json.dumps(docker).encode(), mt.DOCKER_MANIFEST), ImageManifest)
    idx = {"schemaVersion": 2, "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": D, "size": 1}]}
    assert isinstance(parse_manifest(json.dumps(idx).encode()), ImageIndex)
    with pytest.raises(ManifestError, match="does not match"):
        parse_manifest(json.dumps(_manifest_dict()).encode(), mt.DOCKER_MANIFEST)
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"\xff{")
    with pytest.raises(ManifestError, match="index"):
        parse_image_manifest(json.dumps(idx).encode())
    # ManifestError is a ReferenceError_, so callers catching that see it too.
    assert issubclass(ManifestError, ReferenceError_)


def test_embedded_data_is_checked() -> None:
    data = b"{}"
    good = {"mediaType": mt.OCI_EMPTY, "digest": digest.of_bytes(data), "size": 2,
            "data": base64.b64encode(data).decode()}
    assert Descriptor.from_json(good).data == data
    bad = dict(good, data=base64.b64encode(b"[]").decode())
    with pytest.raises(DigestError):
        Descriptor.from_json(bad)
