"""Registry client throughput on loopback against curl: whole-blob download and 4 MiB range reads.

curl's side runs in one process for all ranges (`--next` between them), so it
keeps one connection like our client does; one process per range would
charge curl for 64 process starts. The client checks every blob's sha256 as
it reads and curl checks nothing, so the whole blob is also measured against
curl piped into `openssl dgst -sha256` (OpenSSL's sha256, the one the client
uses): the same work, download and verify. Runs alternate client and curl,
and the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .. import digest as _digest
from ..oci.registry import RegistryClient, RegistryOptions
from ..sandbox.registry import LocalRegistry
from .report import to_markdown

REPO = "bench/blob"
RANGE_SIZE = 4 << 20


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soci-bench registry", description=__doc__)
    p.add_argument("--size-mb", type=int, default=200, help="blob size in MiB (default 200)")
    p.add_argument("--ranges", type=int, default=64, help="number of 4 MiB range reads (default 64)")
    p.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _curl(args: list[str]) -> None:
    subprocess.run(["curl", "-sS", "--fail", *args], check=True, stdout=subprocess.DEVNULL)


def run(args: argparse.Namespace | list[str] | None = None) -> list[dict[str, str]]:
    """Run the benchmark; returns the table rows (also printed as Markdown by main())."""
    ns = args if isinstance(args, argparse.Namespace) else _parse(args)
    size = ns.size_mb << 20
    rng = random.Random(ns.seed)
    tmp = Path(tempfile.mkdtemp(prefix="soci-bench-registry-"))
    try:
        blob = tmp / "blob"
        with open(blob, "wb") as f:
            left = size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        digest = _digest.of_file(blob)
        with LocalRegistry(workdir=tmp / "registry") as reg, \
                RegistryClient(reg.host, RegistryOptions(plain_http=True)) as client:
            client.push_blob(REPO, digest, size, blob)
            url = f"{reg.url}/v2/{REPO}/blobs/{digest}"
            offsets = [rng.randrange(0, size - RANGE_SIZE) for _ in range(ns.ranges)]

            def client_whole() -> None:
                for _ in client.open_blob(REPO, digest, size):
                    pass

            def curl_whole() -> None:
                _curl(["-o", "/dev/null", url])

            def curl_verified() -> None:
                with subprocess.Popen(["curl", "-sS", "--fail", url], stdout=subprocess.PIPE) as curl:
                    got = subprocess.run(["openssl", "dgst", "-sha256", "-r"], stdin=curl.stdout,
                                         capture_output=True, text=True, check=True).stdout
                if curl.returncode != 0 or "sha256:" + got.split()[0] != digest:
                    raise RuntimeError("curl | openssl dgst: download or digest failed")

            def client_ranges() -> None:
                for off in offsets:
                    if len(client.get_blob_range(REPO, digest, off, RANGE_SIZE)) != RANGE_SIZE:
                        raise RuntimeError("short range read")

            def curl_ranges() -> None:
                cmd: list[str] = []
                for i, off in enumerate(offsets):
                    if i:
                        cmd.append("--next")
                    cmd += ["-sS", "--fail", "-r", f"{off}-{off + RANGE_SIZE - 1}", "-o", "/dev/null", url]
                _curl(cmd)

            client_whole()  # warm the registry's page cache and the connection pool
            curl_whole()
            curl_verified()
            times: dict[str, list[float]] = {k: [] for k in ("cw", "uw", "uv", "cr", "ur")}
            for _ in range(ns.runs):
                times["cw"].append(_timed(client_whole))
                times["uw"].append(_timed(curl_whole))
                times["uv"].append(_timed(curl_verified))
                times["cr"].append(_timed(client_ranges))
                times["ur"].append(_timed(curl_ranges))
        med = {k: statistics.median(v) for k, v in times.items()}
        mb = size / (1 << 20)
        n = max(1, ns.ranges)
        return [
            {"test": f"whole blob {ns.size_mb} MiB (digest checked by client)",
             "client": f"{med['cw']:.3f} s ({mb / med['cw']:.0f} MiB/s)",
             "curl": f"{med['uw']:.3f} s ({mb / med['uw']:.0f} MiB/s)",
             "client speed / curl": f"{med['uw'] / med['cw']:.2f}x", "target": ">= 0.8x"},
            {"test": f"whole blob {ns.size_mb} MiB, downloaded and verified (curl piped into openssl dgst -sha256)",
             "client": f"{med['cw']:.3f} s ({mb / med['cw']:.0f} MiB/s)",
             "curl": f"{med['uv']:.3f} s ({mb / med['uv']:.0f} MiB/s)",
             "client speed / curl": f"{med['uv'] / med['cw']:.2f}x", "target": ""},
            {"test": f"{ns.ranges} x 4 MiB ranges, per range",
             "client": f"{med['cr'] / n * 1000:.2f} ms",
             "curl": f"{med['ur'] / n * 1000:.2f} ms",
             "client time / curl": f"{med['cr'] / med['ur']:.2f}x", "target": "<= 1.5x"},
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    print(to_markdown(run(ns)))
    print(f"\nmedians of {ns.runs} interleaved runs on loopback; curl ranges: one process, --next between ranges")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
