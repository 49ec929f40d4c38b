"""Prefetch artifacts built by `soci create|convert --prefetch-file/--prefetch-files-json`: the spans they list,
their place in the index, push, convert and removal. Real layers, a real registry, the CLI as users run it."""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest
import requests
from support.cli import one_error_line, soci
from support.registry import LocalRegistry

from soci_helper.index import soci_index as si
from soci_helper.index.loadorder import LoadOrderItem, plan_spans
from soci_helper.oci.manifest import Descriptor
from soci_helper.oci.source import SourceOptions, open_source
from soci_helper.sandbox.images import write_image
from soci_helper.ztoc import codec
from soci_helper.ztoc import prefetch as pf
from soci_helper.ztoc.model import CompressionAlgorithm, FileMetadata, Ztoc
from soci_helper.ztoc.zinfo import TarZinfo, spans_of

SPAN = 1 << 16
PREFETCH_TYPE = "application/vnd.amazon.soci.prefetch.v1+json"
LAYER_ANNOTATION = "com.amazon.soci.image-layer-digest"

# --- the image: a lower layer and an upper one that overrides, whites out and hides parts of it ------------


def _rand(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _tar(path: Path, entries: list[tuple[str, str, Any]]) -> Path:
    """entries: (name, "dir" | "file" | "symlink" | "hardlink", data or link target), written in order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, value in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1_700_000_000, 0o644
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "file":
                ti.size = len(value)
                tf.addfile(ti, io.BytesIO(value))
            else:
                ti.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                ti.linkname = value
                tf.addfile(ti)
    return path


def _lower(path: Path) -> Path:
    return _tar(path, [
        ("etc/", "dir", None),
        ("etc/link", "symlink", "../usr/lib/c.bin"),
        ("opt/", "dir", None),
        ("opt/old/", "dir", None),
        ("opt/old/d.bin", "file", _rand("d", 90_000)),
        ("usr/", "dir", None),
        ("usr/lib/", "dir", None),
        ("usr/lib/a.bin", "file", _rand("a-lower", 300_000)),
        ("usr/lib/b.bin", "file", _rand("b", 200_000)),
        ("usr/lib/c.bin", "file", _rand("c", 150_000)),
        ("usr/lib/hard", "hardlink", "usr/lib/c.bin"),
    ])


def _upper(path: Path) -> Path:
    # Names as some tools store them ("./..."): requests name files as "/usr/...".
    return _tar(path, [
        ("./", "dir", None),
        ("./opt/", "dir", None),
        ("./opt/old/", "dir", None),
        ("./opt/old/.wh..wh..opq", "file", b""),
        ("./usr/", "dir", None),
        ("./usr/lib/", "dir", None),
        ("./usr/lib/a.bin", "file", _rand("a-upper", 250_000)),
        ("./usr/lib/.wh.b.bin", "file", b""),
        ("./usr/share/", "dir", None),
        ("./usr/share/e.bin", "file", _rand("e", 100_000)),
        ("./usr/share/e-hard", "hardlink", "./usr/share/e.bin"),
        ("./usr/share/empty", "file", b""),
    ])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("pfimage")
    lower, upper = _lower(d / "lower.tar"), _upper(d / "upper.tar")
    desc = write_image(d / "layout", [(lower, "gzip"), (upper, "gzip")], "v1")
    manifest = json.loads((d / "layout" / "blobs" / "sha256" / desc.digest[7:]).read_bytes())
    lo, up = (x["digest"] for x in manifest["layers"])
    return {"layout": d / "layout", "ref": f"oci:{d / 'layout'}:v1", "digest": desc.digest,
            "lower": lo, "upper": up, "tars": {lo: lower, up: upper}}


@pytest.fixture(scope="module")
def registry():
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="module")
def pushed(registry, image):
    return registry.push_oci_layout(image["layout"], "test/pf:v1", tag="v1")


# --- helpers: expected spans from the tar itself and the zTOC's checkpoints, not from the code under test -----


def _blob(root: Path, digest: str) -> bytes:
    return (root / "content" / "blobs" / "sha256" / digest[7:]).read_bytes()


def _blobs(root: Path) -> set[str]:
    d = root / "content" / "blobs" / "sha256"
    return {"sha256:" + p.name for p in d.iterdir()} if d.exists() else set()


def _members(tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar) as t:
        return {m.name.removeprefix("./"): m for m in t.getmembers()}


def _span_starts(ztoc_blob: bytes) -> list[int]:
    """The uncompressed offset of every checkpoint, read straight from the checkpoint blob."""
    cp = codec.decode(ztoc_blob).checkpoints
    count, span = struct.unpack_from("<iq", cp, 0)
    assert span == SPAN and len(cp) == 12 + count * 32785
    return [struct.unpack_from("<qqB", cp, 12 + k * 32785)[1] for k in range(count)]


class Layer:
    """One indexed layer of a built index: its tar members and span boundaries."""

    def __init__(self, root: Path, ztoc: str, tar: Path) -> None:
        self.starts = _span_starts(_blob(root, ztoc))
        self.members = _members(tar)
        self.ztoc_names = [f.name for f in codec.decode(_blob(root, ztoc)).files]

    def ids(self, path: str, offset: int = 0, length: int | None = None) -> list[int]:
        m = self.members[path]
        lo = m.offset_data + offset
        hi = m.offset_data + (m.size if length is None else min(m.size, offset + length))
        s = self.starts
        return [i for i in range(len(s)) if s[i] < hi and (i + 1 == len(s) or s[i + 1] > lo)]


def _first_need(*groups: list[int]) -> list[int]:
    """Span ids in the order first needed, each once."""
    return list(dict.fromkeys(i for g in groups for i in g))


def _index(root: Path) -> tuple[str, dict[str, Any]]:
    (digest,) = soci(root, "index", "list", "-q").stdout.split()
    return digest, json.loads(_blob(root, digest))


def _layers(root: Path, image: dict[str, Any], doc: dict[str, Any]) -> dict[str, Layer]:
    ztocs = {x["annotations"][LAYER_ANNOTATION]: x["digest"] for x in doc["layers"]
             if x["mediaType"] == "application/octet-stream"}
    return {d: Layer(root, z, image["tars"][d]) for d, z in ztocs.items()}


def _prefetches(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {x["annotations"][LAYER_ANNOTATION]: x for x in doc["layers"] if x["mediaType"] == PREFETCH_TYPE}


def _order(root: Path, desc: dict[str, Any]) -> list[int]:
    data = _blob(root, desc["digest"])
    assert len(data) == desc["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    return pf.fetch_order(pf.decode(data))


def _create(root: Path, ref: str, *extra: str, ok: bool = True, dest: str | None = None):
    """`soci create ... REF`, or `soci convert ... REF DEST` when `dest` is given."""
    cmd, tail = ("create", [ref]) if dest is None else ("convert", [ref, dest])
    return soci(root, cmd, "--plain-http", "--span-size", str(SPAN), "--min-layer-size", "0", *extra, *tail, ok=ok)


# --- tests ---------------------------------------------------------------------------------------


WHOLE_FILES = ["/usr/lib/a.bin", "usr/lib/b.bin", "./usr/lib/c.bin", "/opt/old/d.bin", "/usr/share/e-hard",
               "/usr/share/empty", "/etc/link", "/no/such/file"]


def test_prefetch_files_map_to_the_copy_the_merged_view_shows(tmp_path, image):
    args = [a for p in WHOLE_FILES for a in ("--prefetch-file", p)]
    r = _create(tmp_path, image["ref"], *args)
    digest, doc = _index(tmp_path)
    lo, up = image["lower"], image["upper"]
    layers = _layers(tmp_path, image, doc)
    # The upper zTOC keeps the "./" names, so the lookups below really go through normalisation.
    assert "./usr/lib/a.bin" in layers[up].ztoc_names

    # zTOCs first, in layer order, then one prefetch descriptor per layer, each naming its layer.
    assert [x["mediaType"] for x in doc["layers"]] == ["application/octet-stream"] * 2 + [PREFETCH_TYPE] * 2
    assert [x["annotations"] for x in doc["layers"][2:]] == [{LAYER_ANNOTATION: lo}, {LAYER_ANNOTATION: up}]
    pre = _prefetches(doc)
    # Upper: its own a.bin (not the lower copy), then e.bin's data through the hard link e-hard.
    want_up = _first_need(layers[up].ids("usr/lib/a.bin"), layers[up].ids("usr/share/e.bin"))
    # Lower: only c.bin. a.bin is overridden, b.bin whited out, d.bin under an opaque dir, etc/link a symlink.
    want_lo = layers[lo].ids("usr/lib/c.bin")
    assert _order(tmp_path, pre[up]) == want_up
    assert _order(tmp_path, pre[lo]) == want_lo
    # ... and each hidden copy would have added spans, so the equality above really rules them out.
    for hidden in ("usr/lib/a.bin", "usr/lib/b.bin", "opt/old/d.bin"):
        assert set(layers[lo].ids(hidden)) - set(want_lo), hidden
    raw = _blob(tmp_path, pre[lo]["digest"])
    assert raw.startswith(b'{"version":"1.0","prefetch_spans":[{"start_span":')

    out = r.stdout.splitlines()
    ztoc_lines = [i for i, ln in enumerate(out) if " -> ztoc " in ln]
    pf_lines = [ln for ln in out if " -> prefetch " in ln]
    assert pf_lines == [f"layer {lo} -> prefetch {pre[lo]['digest']} ({len(want_lo)} spans)",
                        f"layer {up} -> prefetch {pre[up]['digest']} ({len(want_up)} spans)"]
    assert out.index(pf_lines[0]) > max(ztoc_lines)
    assert "prefetch: 3 of 8 paths are in no indexed layer" in out
    warned = [ln for ln in r.stderr.splitlines() if "WARNING" in ln]
    assert len(warned) == 1 and "3 of 8 items are in no indexed layer" in warned[0]
    for p in ("usr/lib/b.bin", "/opt/old/d.bin", "/no/such/file"):
        assert p in warned[0]

    # Reused zTOCs are read back from the store: the same artifacts and the same index.
    again = _create(tmp_path, image["ref"], *args).stdout
    assert again.count("(existing)") == 2
    assert [ln for ln in again.splitlines() if " -> prefetch " in ln] == pf_lines
    assert f"soci index {digest} " in again


def test_load_order_segments_keep_the_document_order(tmp_path, image):
    doc_items = [
        {"path": "/usr/share/e.bin", "offset": 70_000, "length": 10},
        {"path": "usr/lib/a.bin", "offset": 200_000},
        "/usr/lib/c.bin",
        {"path": "/usr/lib/a.bin", "length": 1},
        {"path": "/usr/lib/a.bin", "offset": 10_000_000},  # past the end: found, but nothing to fetch
    ]
    order = tmp_path / "order.json"
    order.write_text(json.dumps(doc_items))
    r = _create(tmp_path / "root", image["ref"], "--prefetch-files-json", str(order))
    root = tmp_path / "root"
    _, doc = _index(root)
    layers = _layers(root, image, doc)
    up, lo = layers[image["upper"]], layers[image["lower"]]
    want = _first_need(up.ids("usr/share/e.bin", 70_000, 10), up.ids("usr/lib/a.bin", 200_000),
                       up.ids("usr/lib/a.bin", 0, 1))
    assert want != sorted(want), "the document must ask for later spans first, or order would not be tested"
    assert len(up.ids("usr/share/e.bin", 70_000, 10)) == 1
    pre = _prefetches(doc)
    spans = pf.decode(_blob(root, pre[image["upper"]]["digest"]))
    assert pf.fetch_order(spans) == want
    # Priorities rise through the artifact as the document goes: a reader fetches in that order.
    assert [p.priority for p in spans] == list(range(len(spans)))
    assert _order(root, pre[image["lower"]]) == lo.ids("usr/lib/c.bin")
    assert "no indexed layer" not in r.stdout and "WARNING" not in r.stderr


@pytest.mark.parametrize("content, words", [
    ("[\"/usr/lib/a.bin\", ", "not JSON"),
    ('{"path": "/usr/lib/a.bin"}', "array"),
    ('["/usr/lib/a.bin", 42]', "item 1"),
    ('[{"offset": 1}]', "path"),
    ('[{"path": "/usr/lib/a.bin", "offset": -1}]', "offset"),
    ('[{"path": "/usr/lib/a.bin", "length": true}]', "length"),
    ('[{"path": "/usr/lib/a.bin", "lenght": 5}]', "lenght"),
    ('["/"]', "does not name a file"),
])
def test_bad_load_order_is_one_line_and_writes_nothing(tmp_path, image, content, words):
    order = tmp_path / "order.json"
    order.write_text(content)
    root = tmp_path / "root"
    r = _create(root, image["ref"], "--prefetch-files-json", str(order), ok=False)
    line = one_error_line(r)
    assert str(order) in line and words in line.split(str(order), 1)[1]
    assert soci(root, "index", "list", "-q").stdout.split() == []
    assert _blobs(root) == set()
    # convert checks the same way, before writing the destination.
    dst = tmp_path / "conv"
    r = _create(root, image["ref"], "--prefetch-files-json", str(order), ok=False, dest=f"oci:{dst}:v2")
    one_error_line(r)
    assert not dst.exists() and _blobs(root) == set()


def test_missing_load_order_file_and_empty_path_are_one_line(tmp_path, image):
    r = _create(tmp_path, image["ref"], "--prefetch-files-json", str(tmp_path / "nope.json"), ok=False)
    assert "nope.json" in one_error_line(r)
    r = _create(tmp_path, image["ref"], "--prefetch-file", "", ok=False)
    assert "--prefetch-file" in one_error_line(r)
    assert _blobs(tmp_path) == set()


def test_push_sends_prefetch_artifacts_with_the_index(tmp_path, registry, image, pushed):
    _create(tmp_path, pushed, "--prefetch-file", "/usr/lib/c.bin", "--prefetch-file", "/usr/share/e.bin")
    digest, doc = _index(tmp_path)
    pre = _prefetches(doc)
    assert set(pre) == {image["lower"], image["upper"]}
    out = soci(tmp_path, "push", "--plain-http", pushed).stdout.splitlines()
    base = f"{registry.url}/v2/test/pf"
    for p in pre.values():
        assert f"successfully pushed artifact with digest: {p['digest']}" in out
        got = requests.get(f"{base}/blobs/{p['digest']}", timeout=10)
        assert got.status_code == 200
        assert "sha256:" + hashlib.sha256(got.content).hexdigest() == p["digest"]
        assert got.content == _blob(tmp_path, p["digest"])
    man = requests.get(f"{base}/manifests/{digest}", timeout=10,
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert man.status_code == 200 and man.content == _blob(tmp_path, digest)
    assert "sha256:" + hashlib.sha256(man.content).hexdigest() == digest
    assert _prefetches(json.loads(man.content)) == pre
    # Discovery into an empty store brings the artifacts along with the zTOCs.
    fresh = tmp_path / "fresh"
    soci(fresh, "index", "pull", "--plain-http", pushed)
    assert {p["digest"] for p in pre.values()} <= _blobs(fresh)


def test_discovery_leaves_out_an_artifact_that_is_not_one(tmp_path, registry, image, pushed):
    """A prefetch blob that is no artifact costs its layer the prefetch, never the index."""
    from soci_helper.oci.registry import RegistryClient, RegistryOptions

    _create(tmp_path, pushed, "--prefetch-file", "/usr/lib/c.bin", "--prefetch-file", "/usr/share/e.bin")
    _, doc = _index(tmp_path)
    soci(tmp_path, "push", "--plain-http", pushed)
    junk = b'{"version":"9.9","prefetch_spans":[]}'
    junk_digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    bad = next(d for d in doc["layers"] if d["mediaType"] == si.PREFETCH_MEDIA_TYPE)
    good = next(d for d in doc["layers"] if d["mediaType"] == si.PREFETCH_MEDIA_TYPE and d is not bad)
    bad["digest"], bad["size"] = junk_digest, len(junk)
    manifest = si.go_json(doc)
    index_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    client = RegistryClient(registry.host, RegistryOptions(plain_http=True))
    try:
        client.push_blob("test/pf", junk_digest, len(junk), junk)
        client.put_manifest("test/pf", index_digest, manifest, si.MEDIA_TYPE_OCI_MANIFEST)
    finally:
        client.close()
    fresh = tmp_path / "fresh"
    r = soci(fresh, "index", "pull", "--plain-http", "--soci-index-digest", index_digest, pushed)
    assert f"prefetch artifact {junk_digest}" in r.stderr and "left out" in r.stderr
    held = _blobs(fresh)
    assert junk_digest not in held and good["digest"] in held
    assert all(z["digest"] in held for z in doc["layers"] if z["mediaType"] == si.ZTOC_MEDIA_TYPE)


@pytest.mark.parametrize("where", ["oci", "registry"])
def test_convert_carries_the_prefetch_artifacts(tmp_path, registry, image, pushed, where):
    dst = f"oci:{tmp_path / 'conv'}:v2" if where == "oci" else f"{registry.host}/test/pf-conv:v2"
    root = tmp_path / "root"
    r = _create(root, pushed, "--prefetch-file", "/usr/lib/c.bin", "--prefetch-file", "/nowhere", dest=dst)
    assert "prefetch: 1 of 2 paths are in no indexed layer" in r.stdout
    src = open_source(dst, SourceOptions(plain_http=True))
    top = json.loads(src.fetch_manifest(src.resolve()))
    (soci_desc,) = [m for m in top["manifests"] if m.get("artifactType") == si.ARTIFACT_TYPE_V2]
    raw = src.fetch_manifest(Descriptor(media_type=soci_desc["mediaType"], digest=soci_desc["digest"],
                                        size=soci_desc["size"]))
    index = si.parse(raw)
    assert index.artifact_type == si.ARTIFACT_TYPE_V2
    assert [p.layer_digest for p in index.prefetches] == [image["lower"]]
    p = index.prefetches[0]
    assert f"layer {image['lower']} -> prefetch {p.digest} " in r.stdout
    data = b"".join(src.open_blob(Descriptor(media_type=PREFETCH_TYPE, digest=p.digest, size=p.size)))
    assert "sha256:" + hashlib.sha256(data).hexdigest() == p.digest
    layers = _layers(root, image, json.loads(raw))
    assert pf.fetch_order(pf.decode(data)) == layers[image["lower"]].ids("usr/lib/c.bin")


def test_index_rm_keeps_shared_prefetch_artifacts_and_deletes_the_rest(tmp_path, image):
    _create(tmp_path, image["ref"], "--prefetch-file", "/usr/lib/a.bin", "--prefetch-file", "/usr/lib/c.bin")
    (first,) = soci(tmp_path, "index", "list", "-q").stdout.split()
    _create(tmp_path, image["ref"], "--prefetch-file", "/usr/lib/a.bin")
    second = next(d for d in soci(tmp_path, "index", "list", "-q").stdout.split() if d != first)
    doc1, doc2 = json.loads(_blob(tmp_path, first)), json.loads(_blob(tmp_path, second))
    pre1, pre2 = _prefetches(doc1), _prefetches(doc2)
    shared, own = pre1[image["upper"]]["digest"], pre1[image["lower"]]["digest"]
    assert pre2 == {image["upper"]: pre1[image["upper"]]}  # same spans, so the same blob
    ztocs = {x["digest"] for x in doc1["layers"][:2]}

    # rebuild-db reads a store holding prefetch blobs and finds both indexes again.
    (tmp_path / "artifacts.db").unlink()
    for extra in ("artifacts.db-wal", "artifacts.db-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    assert "2 indexes, 4 ztocs" in soci(tmp_path, "rebuild-db").stdout  # each zTOC once per index
    assert sorted(soci(tmp_path, "index", "list", "-q").stdout.split()) == sorted([first, second])

    removed = soci(tmp_path, "index", "rm", first).stdout.splitlines()
    assert removed == [f"removed {first}", f"removed {own}"]
    assert shared in _blobs(tmp_path) and own not in _blobs(tmp_path) and ztocs <= _blobs(tmp_path)
    removed = soci(tmp_path, "index", "rm", second).stdout.splitlines()
    assert set(removed) == {f"removed {d}" for d in (second, shared, *ztocs)}
    assert _blobs(tmp_path).isdisjoint({first, second, shared, own, *ztocs})


# --- the mapping on its own, on hand-made zTOCs of fixed 100-byte spans ----------------------------------------


def _ztoc(entries: list[tuple[str, str, int, int, str]], size: int = 10_000) -> Ztoc:
    files = [FileMetadata(name, typ, off, n, linkname=link) for name, typ, off, n, link in entries]
    return Ztoc("test", size, size, files, CompressionAlgorithm.UNCOMPRESSED, size // 100 - 1,
                ["sha256:" + "0" * 64] * (size // 100), TarZinfo(100, size).to_bytes())


def test_spans_of_clamps_to_the_layer():
    z = TarZinfo(100, 1000)
    assert spans_of(z, 950, 500) == range(9, 10)
    assert spans_of(z, 99, 2) == range(0, 2)
    assert list(spans_of(z, 1000, 5)) == list(spans_of(z, -1, 5)) == list(spans_of(z, 10, 0)) == []


def test_plan_spans_follows_overlay_rules_and_loads_only_what_it_needs():
    lower = _ztoc([("usr/", "dir", 0, 0, ""), ("usr/x", "reg", 512, 300, ""), ("lib/y", "reg", 2048, 50, ""),
                   ("lib/z", "reg", 4096, 10, ""), ("bin/sh", "reg", 6000, 10, "")])
    upper = _ztoc([
        ("usr", "reg", 1024, 10, ""),  # a file where the lower layer had a directory hides usr/x
        ("lib/early", "hardlink", 0, 0, "lib/y"),  # names a member that only comes later: no data
        ("lib/y", "reg", 3000, 150, ""),
        ("lib/z", "symlink", 0, 0, "y"),
    ])
    loaded: list[str] = []

    def load(name: str, z: Ztoc):
        return lambda: (loaded.append(name), z)[1]

    items = [LoadOrderItem("/usr/x"), LoadOrderItem("lib/y", 120), LoadOrderItem("lib/early"),
             LoadOrderItem("/lib/z"), LoadOrderItem("/bin/sh")]
    plan = plan_spans(items, [("up", load("up", upper)), ("lo", load("lo", lower))])
    assert plan.spans == {"up": [31], "lo": [60]}
    assert plan.missing == [items[0]]
    assert loaded == ["up", "lo"]
    # Everything resolved in the top layer: the lower zTOC is never decoded.
    loaded.clear()
    assert plan_spans(items[1:2], [("up", load("up", upper)), ("lo", load("lo", lower))]).spans == {"up": [31]}
    assert loaded == ["up"]


def test_prefetch_list_and_info_show_what_the_indexes_hold(tmp_path, image):
    _create(tmp_path, image["ref"], "--prefetch-file", "/usr/lib/c.bin", "--prefetch-file", "/usr/share/e.bin")
    digest, doc = _index(tmp_path)
    pre = _prefetches(doc)
    rows = [ln.split() for ln in soci(tmp_path, "prefetch", "list").stdout.splitlines()[1:]]
    assert sorted((r[0], r[2], int(r[3]), r[4]) for r in rows) == sorted(
        (p["digest"], layer, len(_order(tmp_path, p)), digest) for layer, p in pre.items())
    assert sorted(soci(tmp_path, "prefetch", "ls", "-q").stdout.split()) == sorted(p["digest"] for p in pre.values())
    layer, p = next(iter(pre.items()))
    info = json.loads(soci(tmp_path, "prefetch", "info", p["digest"][7:19]).stdout)
    assert info["digest"] == p["digest"] and info["layer_digest"] == layer and info["index"] == digest
    want = pf.decode(_blob(tmp_path, p["digest"]))
    assert info["prefetch_spans"] == [{"start_span": s.start, "end_span": s.end, "priority": s.priority}
                                      for s in want]
    assert info["total_spans"] == len(_order(tmp_path, p))
    missing = one_error_line(soci(tmp_path, "prefetch", "info", "ffff0000", ok=False))
    assert "no prefetch artifact ffff0000" in missing
