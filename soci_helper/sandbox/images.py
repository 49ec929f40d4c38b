"""Sample OCI images built from real files on the machine, written as OCI image layouts."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import digest as dg
from ..oci import mediatype as mt
from ..oci.layout import OCILayout
from ..oci.manifest import Descriptor
from ..oci.platform import host_platform


@dataclass(slots=True)
class BuiltLayer:
    descriptor: Descriptor
    diff_id: str
    tar_size: int


def tar_of(dst: Path, root: str, paths: list[str]) -> Path:
    """GNU tar of `paths` (relative to `root`), sorted by name so the bytes are reproducible."""
    subprocess.run(
        ["tar", "--sort=name", "--numeric-owner", "-C", root, "-cf", str(dst), *paths],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return dst


# compression name -> (command compressing stdin-less file to stdout, layer media type)
_COMPRESSORS = {
    "gzip": (["gzip", "-n", "-6", "-c"], mt.OCI_LAYER_GZIP),
    "pigz": (["pigz", "-n", "-6", "-c"], mt.OCI_LAYER_GZIP),
    "zstd": (["zstd", "-q", "-3", "-c"], mt.OCI_LAYER_ZSTD),
}


def compress_file(tar: Path, compression: str) -> tuple[Path, str]:
    """(compressed file, layer media type); "none" gives the tar itself.

    A media type instead of a compression name takes the file as an already-made layer blob.
    """
    if compression == "none":
        return tar, mt.OCI_LAYER
    if "/" in compression:
        return tar, compression
    cmd, media = _COMPRESSORS[compression]
    out = tar.with_name(tar.name + "." + compression)
    with open(out, "wb") as f:
        subprocess.run([*cmd, str(tar)], check=True, stdout=f)
    return out, media


def write_image(layout_dir: Path, tars: list[Path | tuple[Path, str]], tag: str) -> Descriptor:
    """An image whose layers are `tars`, each gzip-compressed or as (tar, "gzip"|"pigz"|"zstd"|"none")."""
    layout = OCILayout(layout_dir, create=True)
    layers: list[BuiltLayer] = []
    for item in tars:
        tar, compression = item if isinstance(item, tuple) else (item, "gzip")
        diff_id = dg.of_file(tar)
        blob, media = compress_file(tar, compression)
        desc = layout.write_blob(blob)
        layers.append(BuiltLayer(Descriptor(media_type=media, digest=desc.digest, size=desc.size), diff_id,
                                 tar.stat().st_size))
        if blob != tar:
            blob.unlink()
    plat = host_platform()
    config = {
        "architecture": plat.architecture,
        "os": plat.os,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    cfg_bytes = json.dumps(config, separators=(",", ":")).encode()
    cfg = layout.write_blob(cfg_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": cfg.digest, "size": cfg.size},
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    data = json.dumps(manifest, separators=(",", ":")).encode()
    man = layout.write_blob(data)
    desc = Descriptor(media_type=mt.OCI_MANIFEST, digest=man.digest, size=man.size)
    layout.add_manifest(desc, tag)
    return desc
