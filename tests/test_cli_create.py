"""`soci create|convert|index|ztoc|rebuild-db` end to end: real registry, real layers, the installed CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support.cli import one_error_line, soci
from support.layers import edge_case_layer, real_files_layer
from support.registry import LocalRegistry, archive_layout

from soci_helper.index import soci_index as si
from soci_helper.oci.layout import OCILayout
from soci_helper.sandbox.images import write_image

SPAN = 1 << 20
MIN = 100_000  # small enough that the test layers get zTOCs, large enough to skip the tiny one


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    d = tmp_path_factory.mktemp("layers")
    real = real_files_layer(d / "real.tar")
    edge = edge_case_layer(d / "edge.tar")
    tiny_root = d / "tiny"
    (tiny_root / "etc").mkdir(parents=True)
    (tiny_root / "etc" / "hello").write_text("hello\n")
    tiny = d / "tiny.tar"
    subprocess.run(["tar", "-C", str(tiny_root), "-cf", str(tiny), "etc"], check=True)
    return {"real": real, "edge": edge, "tiny": tiny}


@pytest.fixture(scope="module")
def image(tmp_path_factory, layers):
    """An OCI layout with a gzip real-files layer, a pigz edge layer, an uncompressed, a zstd and a tiny one."""
    d = tmp_path_factory.mktemp("image")
    desc = write_image(
        d / "layout",
        [
            (layers["real"], "gzip"),
            (layers["edge"], "pigz"),
            (layers["edge"], "none"),
            (layers["real"], "zstd"),
            (layers["tiny"], "gzip"),
        ],
        "v1",
    )
    manifest = json.loads(OCILayout(d / "layout").read_blob(desc.digest))
    return {"layout": d / "layout", "manifest_digest": desc.digest, "manifest": manifest}


@pytest.fixture(scope="module")
def registry():
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="module")
def pushed(registry, image):
    return registry.push_oci_layout(image["layout"], "test/app:v1", tag="v1")


def _create(root: Path, ref: str, *extra: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return soci(root, "create", "--plain-http", "--span-size", str(SPAN), "--min-layer-size", str(MIN), *extra, ref,
                ok=ok)


def test_create_from_registry_builds_v1_index_as_upstream_lays_it_out(tmp_path, pushed, image):
    r = _create(tmp_path, pushed)
    layer_digests = [layer["digest"] for layer in image["manifest"]["layers"]]
    lines = r.stdout.splitlines()
    by_layer = {ln.split()[1]: ln for ln in lines if ln.startswith("layer ")}
    assert set(by_layer) == set(layer_digests)
    real_gz, edge_gz, edge_tar, real_zst, tiny = layer_digests
    for d in (real_gz, edge_gz, edge_tar):
        assert by_layer[d].split()[2:4][0] == "->" and by_layer[d].split()[3] == "ztoc"
        assert by_layer[d].split()[4].startswith("sha256:")
    assert "skipped (zstd layers are not indexable)" in by_layer[real_zst]
    assert "skipped (size" in by_layer[tiny]

    idx_digest = soci(tmp_path, "index", "list", "-q").stdout.split()
    assert len(idx_digest) == 1
    doc = json.loads(soci(tmp_path, "index", "info", idx_digest[0]).stdout)
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["config"] == {
        "mediaType": "application/vnd.amazon.soci.index.v1+json",
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2,
    }
    assert doc["subject"]["digest"] == image["manifest_digest"]
    assert doc["subject"]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert list(doc["annotations"]) == ["com.amazon.soci.build-tool-identifier"]
    assert [x["annotations"]["com.amazon.soci.image-layer-digest"] for x in doc["layers"]] == [real_gz, edge_gz,
                                                                                               edge_tar]
    for x, src in zip(doc["layers"], image["manifest"]["layers"][:3], strict=True):
        assert x["mediaType"] == "application/octet-stream"
        assert x["annotations"]["com.amazon.soci.image-layer-mediaType"] == src["mediaType"]
        assert x["annotations"]["com.amazon.soci.span-size"] == str(SPAN)
    # The stored index bytes are exactly what we serialize (compact, Go key order).
    raw = (tmp_path / "content" / "blobs" / "sha256" / idx_digest[0][7:]).read_bytes()
    assert raw == si.serialize(si.parse(raw))
    assert b" " not in raw.split(b'"annotations"')[0]

    table = soci(tmp_path, "index", "list").stdout.splitlines()
    assert table[0].split() == ["DIGEST", "SIZE", "IMAGE", "REF", "PLATFORM", "MEDIA", "TYPE", "MANIFEST", "VERSION",
                                "CREATED"]
    assert idx_digest[0] in table[1] and pushed in table[1] and " v1 " in table[1]
    ztocs = soci(tmp_path, "ztoc", "list").stdout.splitlines()
    assert ztocs[0].split() == ["DIGEST", "SIZE", "LAYER", "DIGEST"]
    assert {ln.split()[2] for ln in ztocs[1:]} == {real_gz, edge_gz, edge_tar}


def _tar_members(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as t:
        return t.getmembers()


def test_ztoc_info_and_get_file_over_range_requests(tmp_path, pushed, image, layers):
    _create(tmp_path, pushed)
    real_gz = image["manifest"]["layers"][0]["digest"]
    ztoc = soci(tmp_path, "ztoc", "list", "-q", "--layer-digest", real_gz).stdout.split()[0]
    info = json.loads(soci(tmp_path, "ztoc", "info", ztoc).stdout)
    assert set(info) == {"version", "build_tool", "size", "span_size", "num_spans", "num_files", "files"}
    assert info["version"] == "0.9" and info["span_size"] == SPAN
    members = _tar_members(layers["real"])
    assert info["num_files"] == len(members)
    assert [f["filename"] for f in info["files"]] == [m.name + ("/" if m.isdir() else "") for m in members]
    assert info["num_spans"] == -(-layers["real"].stat().st_size // SPAN) or info["num_spans"] > 1
    by_name = {m.name: m for m in members}
    # The layer blob is not in the local store: get-file must go to the registry.
    assert not (tmp_path / "content" / "blobs" / "sha256" / real_gz[7:]).exists()
    picks = [f for f in info["files"] if f["type"] == "reg" and f["size"] > 0]
    multi = max(picks, key=lambda f: f["end_span"] - f["start_span"])
    for f in [picks[0], picks[len(picks) // 2], multi]:
        out = tmp_path / "out.bin"
        soci(tmp_path, "ztoc", "get-file", "--plain-http", ztoc, f["filename"], "-o", str(out))
        with tarfile.open(layers["real"]) as t:
            want = t.extractfile(by_name[f["filename"]]).read()
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(want).digest()
        assert f["offset"] == by_name[f["filename"]].offset_data
    r = soci(tmp_path, "ztoc", "get-file", "--plain-http", ztoc, "no/such/file", ok=False)
    assert "no such file" in one_error_line(r)


def test_existing_ztoc_is_reused_unless_forced(tmp_path, pushed):
    first = _create(tmp_path, pushed).stdout
    again = _create(tmp_path, pushed).stdout
    assert "(existing)" not in first and again.count("(existing)") == 3
    forced = _create(tmp_path, pushed, "-f").stdout
    assert "(existing)" not in forced
    # Same layers, same span size: the rebuilt zTOCs are byte-identical.
    assert sorted(ln.split()[4] for ln in first.splitlines() if "-> ztoc sha256" in ln) == sorted(
        ln.split()[4] for ln in forced.splitlines() if "-> ztoc sha256" in ln
    )


def _ztoc_lines(out: str) -> dict[str, str]:
    return {ln.split()[1]: ln.split()[4] for ln in out.splitlines() if "-> ztoc sha256" in ln}


def test_head_span_layout_is_built_and_reused_apart_from_upstreams(tmp_path, pushed, image, layers):
    # The pigz edge layer holds a file of over a span; the real-files layer has none, so its zTOC is the same.
    edge_gz = image["manifest"]["layers"][1]["digest"]
    plain = _create(tmp_path, pushed).stdout
    heads = _create(tmp_path, pushed, "--head-span", "65536").stdout
    assert _ztoc_lines(heads)[edge_gz] != _ztoc_lines(plain)[edge_gz]
    assert f"{edge_gz} -> ztoc {_ztoc_lines(heads)[edge_gz]} (existing)" not in heads
    # Each layout is found again in the store, not rebuilt and not mistaken for the other.
    for extra, want in ((("--head-span", "65536"), heads), ((), plain)):
        again = _create(tmp_path, pushed, *extra).stdout
        assert f"{edge_gz} -> ztoc {_ztoc_lines(want)[edge_gz]} (existing)" in again
    ztoc = _ztoc_lines(heads)[edge_gz]
    info = json.loads(soci(tmp_path, "ztoc", "info", ztoc).stdout)
    big = max((f for f in info["files"] if f["type"] == "reg"), key=lambda f: f["size"])
    assert big["size"] >= SPAN
    out = tmp_path / "big.bin"
    soci(tmp_path, "ztoc", "get-file", "--plain-http", ztoc, big["filename"], "-o", str(out))
    with tarfile.open(layers["edge"]) as t:
        want_bytes = t.extractfile(big["filename"].rstrip("/")).read()
    assert out.read_bytes() == want_bytes
    bad = _create(tmp_path, pushed, "--head-span", "-1", ok=False)
    assert one_error_line(bad) == "soci: error: --head-span must not be negative"


def test_two_creates_at_once_leave_one_consistent_store(tmp_path, pushed):
    cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", str(tmp_path), "create", "--plain-http",
           "--span-size", str(SPAN), "--min-layer-size", str(MIN), pushed]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(soci(tmp_path, "index", "list", "-q").stdout.split()) == 1
    ztocs = soci(tmp_path, "ztoc", "list", "-q").stdout.split()
    assert len(ztocs) == 3
    for z in ztocs:
        soci(tmp_path, "ztoc", "info", z)  # decodes and validates each stored zTOC
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


def test_create_from_oci_layout_and_archive_match_registry(tmp_path, pushed, image):
    archive = archive_layout(image["layout"], tmp_path / "img.tar")
    digests = []
    for i, src in enumerate([pushed, f"oci:{image['layout']}:v1", f"oci-archive:{archive}:v1"]):
        root = tmp_path / f"r{i}"
        _create(root, src)
        digests.append(soci(root, "index", "list", "-q").stdout.split())
    assert digests[0] == digests[1] == digests[2]


def test_docker_media_types(tmp_path, registry, layers):
    # Docker images cannot carry zstd layers; the uncompressed one becomes a Docker `diff.tar` layer.
    write_image(tmp_path / "layout", [(layers["real"], "gzip"), (layers["edge"], "none"), (layers["tiny"], "gzip")],
                "v1")
    ref = registry.push_oci_layout(tmp_path / "layout", "test/docker:v1", tag="v1", fmt="v2s2")
    out = _create(tmp_path, ref).stdout
    assert out.count("-> ztoc sha256:") == 2 and out.count("skipped (size") == 1
    doc = json.loads(soci(tmp_path, "index", "info", soci(tmp_path, "index", "list", "-q").stdout.split()[0]).stdout)
    assert doc["subject"]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert {x["annotations"]["com.amazon.soci.image-layer-mediaType"] for x in doc["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    }


def test_rebuild_db_and_index_rm(tmp_path, pushed):
    _create(tmp_path, pushed)
    before_i = soci(tmp_path, "index", "list", "-q").stdout.split()
    before_z = sorted(soci(tmp_path, "ztoc", "list").stdout.splitlines()[1:])
    (tmp_path / "artifacts.db").unlink()
    for extra in ("artifacts.db-wal", "artifacts.db-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    assert soci(tmp_path, "index", "list", "-q").stdout.split() == []
    out = soci(tmp_path, "rebuild-db").stdout
    assert "1 indexes, 3 ztocs" in out
    assert soci(tmp_path, "index", "list", "-q").stdout.split() == before_i
    assert sorted(soci(tmp_path, "ztoc", "list").stdout.splitlines()[1:]) == before_z
    removed = soci(tmp_path, "index", "rm", before_i[0]).stdout.splitlines()
    assert len(removed) == 4
    assert soci(tmp_path, "ztoc", "list", "-q").stdout.split() == []
    assert not (tmp_path / "content" / "blobs" / "sha256" / before_i[0][7:]).exists()


def test_convert_to_oci_dir_and_registry(tmp_path, registry, pushed, image):
    for dst in [f"oci:{tmp_path / 'conv'}:v2", f"{registry.host}/test/converted:v2"]:
        root = tmp_path / ("root-" + str(abs(hash(dst))))
        r = soci(root, "convert", "--plain-http", "--span-size", str(SPAN), "--min-layer-size", str(MIN), pushed, dst)
        assert "converted" in r.stdout
        from soci_helper.oci.source import SourceOptions, open_source

        src = open_source(dst, SourceOptions(plain_http=True))
        top = src.resolve()
        assert top.media_type == "application/vnd.oci.image.index.v1+json"
        index = json.loads(src.fetch_manifest(top))
        assert len(index["manifests"]) == 2
        img_desc, soci_desc = index["manifests"]
        assert soci_desc["artifactType"] == "application/vnd.amazon.soci.index.v2+json"
        assert soci_desc["platform"] == img_desc["platform"]
        assert soci_desc["annotations"] == {"com.amazon.soci.image-manifest-digest": img_desc["digest"]}
        from soci_helper.oci.manifest import Descriptor

        man = json.loads(src.fetch_manifest(Descriptor(media_type=img_desc["mediaType"], digest=img_desc["digest"],
                                                       size=img_desc["size"])))
        assert man["annotations"]["com.amazon.soci.index-digest"] == soci_desc["digest"]
        assert [x["digest"] for x in man["layers"]] == [x["digest"] for x in image["manifest"]["layers"]]
        idx = si.parse(src.fetch_manifest(Descriptor(media_type=soci_desc["mediaType"], digest=soci_desc["digest"],
                                                     size=soci_desc["size"])))
        assert idx.artifact_type == si.ARTIFACT_TYPE_V2 and idx.subject is None and len(idx.ztocs) == 3
        for z in idx.ztocs:
            assert src.has_blob(Descriptor(media_type="application/octet-stream", digest=z.digest, size=z.size))
        for layer in man["layers"]:
            assert src.has_blob(Descriptor(media_type=layer["mediaType"], digest=layer["digest"], size=layer["size"]))
        listing = soci(root, "index", "list").stdout
        assert " v2 " in listing


def test_bad_inputs_give_one_clear_line(tmp_path, registry, image, layers):
    r = soci(tmp_path, "create", "--plain-http", f"{registry.host}/no/such:tag", ok=False)
    assert "no/such" in one_error_line(r)
    r = soci(tmp_path, "create", "not a reference!", ok=False)
    one_error_line(r)
    r = soci(tmp_path, "ztoc", "info", "sha256:" + "0" * 64, ok=False)
    one_error_line(r)

    # A layer that says gzip but holds garbage names the layer.
    bad = tmp_path / "bad"
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive at all" * 10000)
    write_image(bad, [garbage], "v1")
    r = soci(tmp_path / "r1", "create", "--min-layer-size", "0", f"oci:{bad}:v1", ok=False)
    line = one_error_line(r)
    assert "layer sha256:" in line

    # A truncated gzip stream (its digest is right: the blob itself was cut when made).
    gz = tmp_path / "real.tar.gz"
    with open(gz, "wb") as f:
        subprocess.run(["gzip", "-c", str(layers["real"])], stdout=f, check=True)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    write_image(tmp_path / "trunc", [(cut, "application/vnd.oci.image.layer.v1.tar+gzip")], "v1")
    r = soci(tmp_path / "r2", "create", "--min-layer-size", "0", f"oci:{tmp_path / 'trunc'}:v1", ok=False)
    assert "layer sha256:" in one_error_line(r)

    # A corrupt zTOC in the store is reported, not decoded into nonsense.
    root = tmp_path / "r3"
    soci(root, "create", "--min-layer-size", str(MIN), "--span-size", str(SPAN), f"oci:{image['layout']}:v1")
    z = soci(root, "ztoc", "list", "-q").stdout.split()[0]
    path = root / "content" / "blobs" / "sha256" / z[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = soci(root, "ztoc", "info", z, ok=False)
    assert "damaged" in one_error_line(r)


def test_tampered_layer_blob_is_a_digest_error(tmp_path, image):
    copy = tmp_path / "layout"
    shutil.copytree(image["layout"], copy)
    real_gz = image["manifest"]["layers"][0]["digest"]
    blob = copy / "blobs" / "sha256" / real_gz[7:]
    data = bytearray(blob.read_bytes())
    data[-8] ^= 1  # the gzip CRC: the tar still parses, so only the digest or the CRC can catch it
    blob.write_bytes(bytes(data))
    r = soci(tmp_path, "create", "--min-layer-size", str(MIN), f"oci:{copy}:v1", ok=False)
    line = one_error_line(r)
    assert "digest" in line or "crc" in line.lower() or "check" in line.lower()
