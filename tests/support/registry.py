"""Real registries and OCI images for tests: the sandbox `docker-registry` and hand-built image layouts.

Usage::

    with LocalRegistry() as reg:                       # plain HTTP, no auth
        reg.push_oci_layout(layout_dir, "demo/app:v1")
        src = open_source(f"{reg.host}/demo/app:v1", reg.source_options())

    with LocalRegistry(tls=True, auth=True) as reg:    # HTTPS with a test CA + htpasswd
        reg.ca_file, reg.user, reg.password            # what a client needs

    layout = build_image(tmp_path / "img", tag="v1")   # single-platform OCI layout
    multi = build_multiplatform_image(tmp_path / "mp", tag="v1",
                                      platforms=["linux/amd64", "linux/arm64/v8"])

A module-scoped pytest fixture is the cheap way to share one registry::

    @pytest.fixture(scope="module")
    def registry():
        with LocalRegistry() as reg:
            yield reg

The registry always stops and its temporary directory is removed, even when
starting it fails half way or the test raises. Nothing touches the system
trust store: the TLS registry's CA exists only in its temp dir, so a client
that succeeds must have honoured `ca_file`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soci_helper.sandbox.registry import LocalRegistry, RegistryStartError, make_test_ca_and_cert  # noqa: F401

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

# --- hand-built OCI image layouts -------------------------------------------


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A reproducible tar.gz layer of regular files; returns (gzip bytes, diff_id of the tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d + "/")
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                    tar.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(files[name]))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), _sha(tar_bytes)


@dataclass
class BuiltImage:
    """What build_image wrote: the layout dir and the pieces, for comparisons in tests."""

    path: Path
    tag: str
    top_digest: str  # the tagged descriptor's digest (a manifest or an index)
    top_media_type: str
    manifests: dict[str, str] = field(default_factory=dict)  # platform string -> manifest digest
    layers: dict[str, bytes] = field(default_factory=dict)  # layer digest -> gzip bytes
    configs: dict[str, bytes] = field(default_factory=dict)

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def _write_blob(root: Path, data: bytes) -> str:
    d = _sha(data)
    p = root / "blobs" / "sha256" / d.split(":", 1)[1]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return d


def _write_index_json(root: Path, entries: list[dict[str, Any]]) -> None:
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    (root / "index.json").write_bytes(_canon(index))


def _platform_json(plat: str) -> dict[str, str]:
    parts = plat.split("/")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) > 2:
        out["variant"] = parts[2]
    return out


def _write_platform_manifest(root: Path, img: BuiltImage, plat: str,
                             layer_files: list[dict[str, bytes]]) -> tuple[str, int]:
    diff_ids, layer_descs = [], []
    for files in layer_files:
        gz, diff_id = make_layer(files)
        d = _write_blob(root, gz)
        img.layers[d] = gz
        diff_ids.append(diff_id)
        layer_descs.append({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": len(gz)})
    config: dict[str, Any] = {
        "created": "2024-01-01T00:00:00Z",
        **_platform_json(plat),
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg = _canon(config)
    cfg_d = _write_blob(root, cfg)
    img.configs[cfg_d] = cfg
    manifest = _canon({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_d, "size": len(cfg)},
        "layers": layer_descs,
    })
    md = _write_blob(root, manifest)
    img.manifests[plat] = md
    return md, len(manifest)


def default_layers(plat: str = "linux/amd64") -> list[dict[str, bytes]]:
    """Two small layers whose content differs per platform (so digests differ)."""
    # Incompressible, so the gzip layer is big enough for meaningful range reads.
    big = random.Random(plat).randbytes(200_000)
    return [
        {"etc/hostname": b"soci-test\n", "etc/platform": plat.encode() + b"\n"},
        {"usr/share/data.bin": big, "usr/share/readme.txt": b"hello " + plat.encode() + b"\n"},
    ]


def build_image(path: str | Path, tag: str = "latest", platform: str = "linux/amd64",
                layers: list[dict[str, bytes]] | None = None) -> BuiltImage:
    """Write a single-platform OCI image layout at `path`, tagged `tag` in index.json."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    img = BuiltImage(path=root, tag=tag, top_digest="", top_media_type=OCI_MANIFEST)
    md, size = _write_platform_manifest(root, img, platform, layers or default_layers(platform))
    img.top_digest = md
    _write_index_json(root, [{"mediaType": OCI_MANIFEST, "digest": md, "size": size,
                              "annotations": {REF_NAME: tag}}])
    return img


def build_multiplatform_image(path: str | Path, tag: str = "latest",
                              platforms: tuple[str, ...] | list[str] = ("linux/amd64", "linux/arm64/v8"),
                              ) -> BuiltImage:
    """Write an OCI layout whose tag names an image index with one manifest per platform."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    img = BuiltImage(path=root, tag=tag, top_digest="", top_media_type=OCI_INDEX)
    entries = []
    for plat in platforms:
        md, size = _write_platform_manifest(root, img, plat, default_layers(plat))
        entries.append({"mediaType": OCI_MANIFEST, "digest": md, "size": size,
                        "platform": _platform_json(plat)})
    index = _canon({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    idx = _write_blob(root, index)
    img.top_digest = idx
    _write_index_json(root, [{"mediaType": OCI_INDEX, "digest": idx, "size": len(index),
                              "annotations": {REF_NAME: tag}}])
    return img


def archive_layout(layout_dir: str | Path, archive: str | Path) -> Path:
    """Tar an OCI layout directory into an OCI archive (uncompressed, paths relative to the layout)."""
    src, out = Path(layout_dir), Path(archive)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    return out
