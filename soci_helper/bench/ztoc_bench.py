"""zTOC benchmark: `soci create` throughput and memory against `gzip -dc`, and span extraction time."""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..sandbox.images import tar_of, write_image
from ..ztoc import codec
from ..ztoc.extract import extract_span
from ..ztoc.reader import parse_zinfo

# Real files that compress to well over 150 MB on a Debian machine with this project's packages.
DEFAULT_DIRS = ["usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib/python3", "usr/share/locale"]


def cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("soci-bench"))


def build_layer(min_gz_bytes: int, dirs: list[str]) -> tuple[Path, Path]:
    """A cached OCI layout holding one gzip layer of real files; returns (layout dir, tar)."""
    have = [d for d in dirs if os.path.isdir("/" + d)]
    key = hashlib.sha256(("\n".join(have)).encode()).hexdigest()[:12]
    root = cache_dir() / f"ztoc-{key}"
    layout, tar = root / "layout", root / "layer.tar"
    if (root / "done").exists():
        return layout, tar
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"building the benchmark layer from /{', /'.join(have)} ...", file=sys.stderr)
    tar_of(tar, "/", have)
    write_image(layout, [tar], "bench")
    (root / "done").write_text("")
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    if blobs[-1].stat().st_size < min_gz_bytes:
        print(f"warning: the layer is only {blobs[-1].stat().st_size / 1e6:.0f} MB compressed", file=sys.stderr)
    return layout, tar


def _timed(cmd: list[str], env: dict[str, str] | None = None, stdout: int | None = subprocess.DEVNULL
           ) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed: {err.strip()[-500:]}")
    return elapsed, usage.ru_maxrss * 1024


def run(args: argparse.Namespace) -> str:
    layout, tar = build_layer(150_000_000, args.dirs or DEFAULT_DIRS)
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer = blobs[-1]
    tar_mb = tar.stat().st_size / 1e6
    results: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    work = Path(tempfile.mkdtemp(prefix="soci-bench-"))
    backends = ["zlib-ng", "zlib"]
    try:
        for i in range(args.runs):
            t, _ = _timed(["gzip", "-dc", str(layer)])
            results.setdefault("gzip -dc", []).append(t)
            for b in backends:
                root = work / f"root-{b}-{i}"
                env = dict(os.environ, SOCI_INFLATE=b)
                cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", str(root), "create",
                       f"oci:{layout}:bench"]
                t, peak = _timed(cmd, env)
                results.setdefault(f"soci create ({b})", []).append(t)
                rss.setdefault(f"soci create ({b})", []).append(peak)
                if i < args.runs - 1:
                    shutil.rmtree(root)
        ztoc_dir = work / f"root-zlib-ng-{args.runs - 1}" / "content" / "blobs" / "sha256"
        ztoc_blob = max(ztoc_dir.iterdir(), key=lambda p: p.stat().st_size)
        ztoc = codec.decode(ztoc_blob.read_bytes())
        zinfo = parse_zinfo(ztoc)
        rng = random.Random(42)
        span_ms: list[float] = []
        with open(layer, "rb") as f:
            for sid in rng.sample(range(zinfo.num_spans - 1), min(40, zinfo.num_spans - 1)):
                start, end = zinfo.compressed_range(sid)
                f.seek(start)
                data = f.read(end - start)
                t0 = time.perf_counter()
                extract_span(zinfo, sid, data)
                span_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(results["gzip -dc"])
    lines = [
        f"layer: {layer.stat().st_size / 1e6:.0f} MB gzip, {tar_mb:.0f} MB tar, {ztoc.max_span_id + 1} spans, "
        f"{len(ztoc.files)} files; {args.runs} runs interleaved, medians",
        "",
        "| measure | median | spread | uncompressed MB/s | ratio vs gzip -dc | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, ts in results.items():
        med = statistics.median(ts)
        target = "" if name == "gzip -dc" else ">= 1.5x"
        lines.append(f"| {name} | {med:.2f} s | {min(ts):.2f}-{max(ts):.2f} s | {tar_mb / med:.0f} | "
                     f"{base / med:.2f}x | {target} |")
    for name, peaks in rss.items():
        lines.append(f"| peak RSS, {name} | {statistics.median(peaks) / 1e6:.0f} MB | "
                     f"{min(peaks) / 1e6:.0f}-{max(peaks) / 1e6:.0f} MB | | | <= 150 MB |")
    lines.append(f"| extract one 4 MiB span ({len(span_ms)} spans) | {statistics.median(span_ms):.1f} ms | "
                 f"{min(span_ms):.1f}-{max(span_ms):.1f} ms | | | <= 10 ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soci-bench ztoc", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per measurement (default 5)")
    p.add_argument("--dirs", nargs="*", help="directories (relative to /) to build the layer from")
    print(run(p.parse_args(argv)))
    return 0
