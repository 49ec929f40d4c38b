"""The embedded end-to-end demo: a local registry, a sample image of real files, `soci create` and friends."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .sandbox.images import tar_of, write_image
from .sandbox.registry import LocalRegistry

SAMPLE_DIRS = ["usr/lib/python3.11", "usr/share/perl", "usr/lib/python3"]


def _soci(root: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", str(root), *args]
    print("$ soci " + " ".join(args), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"demo: `soci {' '.join(args)}` failed with exit code {r.returncode}")
    return r.stdout


def _sample_dirs() -> list[str]:
    have = [d for d in SAMPLE_DIRS if os.path.isdir("/" + d)]
    if not have:
        raise SystemExit("demo: none of the sample directories exist: " + ", ".join("/" + d for d in SAMPLE_DIRS))
    return have


def run(workdir: Path) -> None:
    t0 = time.monotonic()
    with LocalRegistry(workdir=workdir / "registry") as reg:
        print(f"registry: docker-registry on {reg.url}")
        dirs = _sample_dirs()
        big = tar_of(workdir / "big.tar", "/", dirs)
        small_root = workdir / "small"
        (small_root / "etc").mkdir(parents=True)
        (small_root / "etc" / "motd").write_text("built by the soci-helper demo\n")
        small = tar_of(workdir / "small.tar", str(small_root), ["etc"])
        write_image(workdir / "layout", [big, small], "v1")
        ref = reg.push_oci_layout(workdir / "layout", "demo/sample:v1", tag="v1")
        print(f"image: {ref} (layers: /{', /'.join(dirs)} = {big.stat().st_size / 1e6:.1f} MB tar; /etc/motd)")

        root = workdir / "root"
        print(_soci(root, "create", "--plain-http", ref), end="")
        listing = _soci(root, "ztoc", "list", "-q").split()
        if len(listing) != 1:
            raise SystemExit(f"demo: expected one zTOC, found {len(listing)}")
        ztoc = listing[0]
        info = json.loads(_soci(root, "ztoc", "info", ztoc))
        print(
            f"ztoc {ztoc}: {info['size']} bytes, version {info['version']}, {info['num_files']} files, "
            f"{info['num_spans']} spans of {info['span_size']} bytes"
        )
        regular = [f for f in info["files"] if f["type"] == "reg" and f["size"] > 10000]
        pick = regular[len(regular) // 2]
        out = workdir / "extracted"
        served_before = reg.bytes_served()
        _soci(root, "ztoc", "get-file", "--plain-http", ztoc, pick["filename"], "-o", str(out))
        fetched = reg.bytes_served() - served_before
        layer_size = max(p.stat().st_size for p in (workdir / "layout" / "blobs" / "sha256").iterdir())
        want = hashlib.sha256(Path("/", pick["filename"]).read_bytes()).hexdigest()
        got = hashlib.sha256(out.read_bytes()).hexdigest()
        spans = pick["end_span"] - pick["start_span"] + 1
        print(
            f"get-file {pick['filename']}: {pick['size']} bytes from {spans} of {info['num_spans']} spans "
            f"through HTTP Range requests; sha256 {'matches' if got == want else 'DIFFERS from'} the original"
        )
        print(
            f"registry served {fetched / 1e6:.2f} MB for it, {fetched / layer_size:.1%} of the "
            f"{layer_size / 1e6:.1f} MB layer blob"
        )
        if got != want:
            raise SystemExit("demo: extracted file differs from the original")
        print(_soci(root, "index", "list"), end="")
    print(f"demo finished in {time.monotonic() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soci-demo", description=__doc__)
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="soci-demo-"))
    try:
        run(workdir)
    finally:
        if args.keep:
            print(f"state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
