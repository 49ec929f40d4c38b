"""Real gzip layers for the ztoc tests (GNU tar, gzip, pigz) and an indexed_gzip-based oracle."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Layer:
    name: str
    path: Path
    multi_member: bool

    def data(self) -> bytes:
        return self.path.read_bytes()


def _need(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed")
    return exe


def make_tar(dest: Path, limit: int = 24 << 20) -> Path:
    """A tar of the running interpreter's standard library, cut to about `limit` bytes of members."""
    tar = _need("tar")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Keep the test data modest: take top-level entries in sorted order until the budget is spent.
    picked: list[str] = []
    total = 0
    for entry in sorted(os.listdir(stdlib)):
        if entry in ("site-packages", "dist-packages", "__pycache__"):
            continue
        p = stdlib / entry
        if p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        else:
            size = p.stat().st_size
        if total + size > limit:
            continue
        picked.append(entry)
        total += size
    out = dest / "layer.tar"
    subprocess.run([tar, "--format=gnu", "-cf", str(out), "-C", str(stdlib), "--exclude=__pycache__",
                    *picked], check=True)
    return out


def gzip_stdin(src: bytes, *args: str, tool: str = "gzip") -> bytes:
    exe = _need(tool)
    return subprocess.run([exe, *args, "-c"], input=src, stdout=subprocess.PIPE, check=True).stdout


def gunzip(data: bytes) -> bytes:
    """The reference decompression: `gzip -dc`, which reads all members."""
    exe = _need("gzip")
    return subprocess.run([exe, "-dc"], input=data, stdout=subprocess.PIPE, check=True).stdout


def build_layers(dest: Path) -> dict[str, Layer]:
    tar = make_tar(dest).read_bytes()
    third = len(tar) // 3
    rnd = os.urandom(3 << 20)
    # Incompressible runs between text make stored blocks that start right after Huffman blocks,
    # so some spans begin with leftover bits followed by a stored block.
    mixed = b"".join(tar[k << 19:(k + 1) << 19] + rnd[k << 18:(k + 1) << 18] for k in range(10))
    specs: dict[str, tuple[bytes, bool]] = {
        "gzip6": (gzip_stdin(tar, "-6"), False),
        "pigz": (gzip_stdin(tar, "-6", tool="pigz"), False),
        "pigz_i": (gzip_stdin(tar, "-6", "-i", tool="pigz"), False),
        "stored": (gzip_stdin(rnd, "-1"), False),
        "mixed": (gzip_stdin(mixed, "-1"), False),
        # Concatenated members, an empty one among them, as `cat a.gz b.gz` makes.
        "members": (gzip_stdin(tar[:third], "-6") + gzip_stdin(b"", "-6")
                    + gzip_stdin(tar[third:2 * third], "-1", tool="pigz")
                    + gzip_stdin(tar[2 * third:], "-9", "-i", tool="pigz"), True),
    }
    layers = {}
    for name, (blob, multi) in specs.items():
        p = dest / f"{name}.gz"
        p.write_bytes(blob)
        layers[name] = Layer(name, p, multi)
    return layers


@dataclass(frozen=True)
class OraclePoint:
    comp: int
    uncomp: int
    bits: int
    window: bytes | None


def indexed_gzip_points(path: Path, span_size: int) -> list[OraclePoint]:
    """Access points indexed_gzip places with its `>= spacing` rule, read from its export format.

    Its rule compares with `>=` where upstream's compares with `>`, so the caller passes
    span_size + 1 as spacing to get upstream's placement.
    """
    igz = pytest.importorskip("indexed_gzip")
    f = igz.IndexedGzipFile(str(path), spacing=span_size, window_size=32768)
    try:
        f.build_full_index()
        buf = io.BytesIO()
        f.export_index(fileobj=buf)
    finally:
        f.close()
    data = buf.getvalue()
    assert data[:5] == b"GZIDX"
    _csize, _usize, _spacing, wsize, npoints = struct.unpack_from("<QQIII", data, 7)
    off = 7 + 28
    heads = []
    for _ in range(npoints):
        heads.append(struct.unpack_from("<QQBB", data, off))
        off += 18
    points = []
    for comp, uncomp, bits, has_window in heads:
        window = None
        if has_window:
            window = data[off:off + wsize]
            off += wsize
        points.append(OraclePoint(comp, uncomp, bits, window))
    assert off == len(data)
    return points


def oracle_blob(path: Path, span_size: int) -> bytes:
    """Upstream's checkpoint blob for a single-member gzip, derived from indexed_gzip's index.

    indexed_gzip adds a window-less point right after the gzip header (upstream's checkpoint 0,
    whose window is all zeros) and one more at end of file (upstream has none there).
    """
    pts = indexed_gzip_points(path, span_size + 1)
    first, inner, eof = pts[0], pts[1:-1], pts[-1]
    assert first.uncomp == 0 and first.window is None
    assert eof.uncomp >= (inner[-1].uncomp if inner else 0)
    parts = [struct.pack("<iq", 1 + len(inner), span_size),
             struct.pack("<qqB", first.comp, 0, 0), bytes(32768)]
    for p in inner:
        assert p.window is not None
        parts += [struct.pack("<qqB", p.comp, p.uncomp, p.bits), p.window]
    return b"".join(parts)
