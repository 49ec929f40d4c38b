"""Lazy layer filesystem against a full local extraction: mount time, server RSS, read throughput, first byte."""

# Everything (registry storage, store root, span cache, extractions) lives on a tmpfs this benchmark mounts
# and unmounts itself, so neither the root filesystem's state nor its speed enters the figures. Runs are
# interleaved (lazy, local, lazy, local, ...) so that load from other processes hits both sides alike.

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..fs.server import AT_REST_AFTER_SEC as REST_SEC
from ..fs.server import MODULE as SERVER_MODULE
from ..sandbox.images import write_image
from ..sandbox.procs import pids_matching
from ..sandbox.registry import LocalRegistry
from ..sandbox.signals import UnwindOnSignal
from .report import to_markdown

REPO = "bench/fs"
CHUNK = 1 << 20
BIG_NAME = "data/big.bin"
TARGETS = {
    "mount": "<= 1 s",
    "rss": "<= 60 MB",
    "first": ">= 200 MB/s",
    "second": ">= 2 GB/s",
    "dropped": ">= 1 GB/s",
    "byte": "<= 30 ms",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soci-bench fs", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per measurement (default 5)")
    p.add_argument("--files", type=int, default=100_000, help="entries of the small-files layer (default 100000)")
    p.add_argument("--big-mb", type=int, default=100, help="size of the big file in MB (default 100)")
    p.add_argument("--read-files", type=int, default=20_000,
                   help="small files read through the mount before the second RSS sample (default 20000)")
    p.add_argument("--tmpfs-size", default="4g", help="size of the benchmark's tmpfs (default 4g)")
    return p.parse_args(argv)


# --- building the layers ----------------------------------------------------------------


def _real_bytes(total: int, sources: tuple[str, ...] = ("/usr/lib", "/usr/share", "/usr/bin")) -> Iterator[bytes]:
    """`total` bytes of installed files, concatenated in a fixed order: compresses like real layers do."""
    left = total
    while left > 0:
        before = left
        for src in sources:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path):
                        continue
                    try:
                        with open(path, "rb") as f:
                            data = f.read(left)
                    except OSError:
                        continue
                    if data:
                        left -= len(data)
                        yield data
                    if left <= 0:
                        return
        if left == before:
            raise RuntimeError("no readable files to build the big layer from")


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
         mtime: int = 1_700_000_000, kind: bytes = tarfile.REGTYPE) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = mtime
    ti.uname = ti.gname = "root"
    if data is not None:
        ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data) if data is not None else None)


def build_big_tar(path: Path, size: int) -> Path:
    """One `size`-byte file of real-ish data plus a few small files."""
    spool = path.with_suffix(".data")
    with open(spool, "wb") as out:
        for chunk in _real_bytes(size):
            out.write(chunk)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "data/", mode=0o755, kind=tarfile.DIRTYPE)
        ti = tarfile.TarInfo(BIG_NAME)
        ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = size, 0o644, 1_700_000_000, "root", "root"
        with open(spool, "rb") as f:
            tf.addfile(ti, f)
        for i in range(200):
            _add(tf, f"etc/conf{i:03d}", f"setting_{i} = {i * 7}\n".encode() * (1 + i % 20))
    spool.unlink()
    return path


def _small_file(i: int) -> str:
    return f"usr/share/pkg{i // 500:04d}/sub{(i // 50) % 10}/file_{i:06d}.txt"


def probe_name(count: int) -> str:
    """A file about halfway through the small-files layer (directories take about 1% of the entries)."""
    return _small_file(count // 2 - count // 50)


def build_small_tar(path: Path, count: int) -> Path:
    """`count` entries: small text files 500 to a directory, with their directories, distinct mtimes."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        made: set[str] = set()
        n = 0
        i = 0
        while n < count:
            name = _small_file(i)
            d = name.rsplit("/", 1)[0]
            parts = d.split("/")
            for k in range(1, len(parts) + 1):
                p = "/".join(parts[:k]) + "/"
                if p not in made and n < count:
                    made.add(p)
                    _add(tf, p, mode=0o755, kind=tarfile.DIRTYPE)
                    n += 1
            if n < count:
                _add(tf, name, f"line {i} of a small file\n".encode() * (1 + i % 9),
                     mtime=1_700_000_000 + i)
                n += 1
            i += 1
    return path


# --- the state on tmpfs -----------------------------------------------------------------


class Bench:
    """The tmpfs, the registry, the store root, and the mounts made on them; close() undoes all of it."""

    def __init__(self, tmpfs_size: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="soci-bench-fs-"))
        self.mounted_tmpfs = False
        self.registry: LocalRegistry | None = None
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0755", "tmpfs", str(self.base)],
                       check=True, capture_output=True)
        self.mounted_tmpfs = True
        self.root = self.base / "root"
        self.work = self.base / "work"
        self.work.mkdir()

    # --- cleanup --------------------------------------------------------------

    def _mounts_below(self) -> list[str]:
        base = str(self.base)
        found = []
        with open("/proc/mounts") as f:
            for line in f:
                mp = line.split(" ")[1].replace("\\040", " ")
                if mp.startswith(base + "/"):
                    found.append(mp)
        return sorted(found, key=len, reverse=True)

    def _servers(self) -> list[int]:
        return pids_matching(SERVER_MODULE, str(self.root))

    def close(self) -> None:
        for mp in self._mounts_below():
            for cmd in (["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]):
                subprocess.run(cmd, capture_output=True, timeout=30, check=False)
                if mp not in self._mounts_below():
                    break
        for pid in self._servers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.registry is not None:
            self.registry.stop()
            self.registry = None
        if self.mounted_tmpfs:
            deadline = time.monotonic() + 10
            while subprocess.run(["umount", str(self.base)], capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    subprocess.run(["umount", "-l", str(self.base)], capture_output=True)
                    break
                time.sleep(0.2)
            self.mounted_tmpfs = False
        shutil.rmtree(self.base, ignore_errors=True)

    # --- lazy mounts ------------------------------------------------------------

    def mount(self, source: str, mnt: Path) -> float:
        mnt.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        r = subprocess.run(["mount", "-t", "fuse.soci", source, str(mnt), "-o", f"ro,plain_http,root={self.root}"],
                           capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"mount of {source} failed: {r.stderr.strip()}")
        return took

    def server_pid(self, mnt: Path) -> int:
        for state in (self.root / "mounts").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(state.read_text())
                if doc.get("mountpoint") == str(mnt) and doc.get("state") == "alive":
                    return int(doc["pid"])
        raise RuntimeError(f"no live layer server for {mnt}")

    def umount(self, mnt: Path, pid: int | None = None) -> None:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)
        if pid is not None:
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.02)

    def drop_span_cache(self) -> None:
        shutil.rmtree(self.root / "spans", ignore_errors=True)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> float:
    """Seconds to read `path` start to end in 1 MiB reads."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def first_byte(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        if not f.read(1):
            raise RuntimeError(f"{path} is empty")
    return time.perf_counter() - t0


def read_files(root: Path, count: int) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                f.read()
            n += 1
            if n >= count:
                return n
    return n


# --- the run ----------------------------------------------------------------------------


def _prepare(b: Bench, ns: argparse.Namespace, log: Callable[[str], None]) -> dict[str, object]:
    log("building the layers")
    big = build_big_tar(b.work / "big.tar", ns.big_mb * 1_000_000)
    small = build_small_tar(b.work / "small.tar", ns.files)
    layout = b.work / "layout"
    desc = write_image(layout, [(big, "gzip"), (small, "gzip")], "v1")
    from ..oci.layout import OCILayout

    manifest = json.loads(OCILayout(layout).read_blob(desc.digest))
    layers = [x["digest"] for x in manifest["layers"]]
    blobs = [layout / "blobs" / "sha256" / d.split(":", 1)[1] for d in layers]
    b.registry = LocalRegistry(workdir=b.base / "registry")
    b.registry.start()
    log("pushing and indexing")
    ref = b.registry.push_oci_layout(layout, f"{REPO}:v1", tag="v1")
    cmd = [sys.executable, "-m", "soci_helper.cli.main", "--root", str(b.root), "create", "--plain-http",
           "--min-layer-size", "0", ref]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"soci create failed: {r.stderr.strip()}")
    # Lazy reads must come from the registry: a layer blob kept in the local store would be read from there.
    from ..store.content import ContentStore

    store = ContentStore(b.root)
    for d in layers:
        if store.has(d):
            store.path(d).unlink()
    big.unlink()
    small.unlink()
    return {"big_blob": blobs[0], "small_blob": blobs[1],
            "big_src": f"{b.registry.host}/{REPO}@{layers[0]}", "small_src": f"{b.registry.host}/{REPO}@{layers[1]}"}


def run(ns: argparse.Namespace, log: Callable[[str], None] = lambda m: None) -> tuple[list[dict[str, str]], str]:
    b = Bench(ns.tmpfs_size)
    UnwindOnSignal("soci-bench fs").install()
    try:
        ctx = _prepare(b, ns, log)
        m: dict[str, list[float]] = {k: [] for k in (
            "mount", "tar", "rss", "rss_read", "rss_rest", "first", "second", "dropped", "l_first", "l_second",
            "l_dropped", "byte", "l_byte")}
        mnt_small, mnt_big = b.work / "mnt-small", b.work / "mnt-big"
        ext = b.work / "extracted"
        size = ns.big_mb * 1_000_000
        for i in range(ns.runs):
            log(f"run {i + 1}/{ns.runs}")
            # Lazy, small-files layer: mount time, RSS, cold first byte, RSS after many reads.
            b.drop_span_cache()
            m["mount"].append(b.mount(str(ctx["small_src"]), mnt_small))
            pid = b.server_pid(mnt_small)
            m["rss"].append(rss_mb(pid))
            m["byte"].append(first_byte(mnt_small / probe_name(ns.files)))
            if ns.read_files:
                read_files(mnt_small, ns.read_files)
                m["rss_read"].append(rss_mb(pid))
                # Resting: the server hands freed buffers back after a quiet stats period.
                time.sleep(REST_SEC)
                m["rss_rest"].append(rss_mb(pid))
            b.umount(mnt_small, pid)
            # Local: extracting that layer, then the same first byte.
            ext.mkdir()
            t0 = time.perf_counter()
            subprocess.run(["tar", "-xzf", str(ctx["small_blob"]), "-C", str(ext)], check=True)
            m["tar"].append(time.perf_counter() - t0)
            drop_caches()
            m["l_byte"].append(first_byte(ext / probe_name(ns.files)))
            shutil.rmtree(ext)
            # Lazy, big file: cold span cache and fresh mount; then page cache; then span cache on disk only.
            b.drop_span_cache()
            drop_caches()
            b.mount(str(ctx["big_src"]), mnt_big)
            pid = b.server_pid(mnt_big)
            m["first"].append(size / read_all(mnt_big / BIG_NAME))
            m["second"].append(size / read_all(mnt_big / BIG_NAME))
            drop_caches()
            m["dropped"].append(size / read_all(mnt_big / BIG_NAME))
            b.umount(mnt_big, pid)
            # Local: the same file from the extracted layer on the same tmpfs.
            ext.mkdir()
            subprocess.run(["tar", "-xzf", str(ctx["big_blob"]), "-C", str(ext)], check=True)
            drop_caches()
            m["l_first"].append(size / read_all(ext / BIG_NAME))
            m["l_second"].append(size / read_all(ext / BIG_NAME))
            drop_caches()
            m["l_dropped"].append(size / read_all(ext / BIG_NAME))
            shutil.rmtree(ext)
        return _rows(m, ns), _notes(ns)
    finally:
        b.close()


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(min(xs))}-{fmt(max(xs))}" if xs else ""


def _rate(v: float) -> str:
    return f"{v / 1e9:.2f} GB/s" if v >= 1e9 else f"{v / 1e6:.0f} MB/s"


def _secs(v: float) -> str:
    return f"{v:.2f} s"


def _ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


def _mb(v: float) -> str:
    return f"{v:.0f} MB"


def _met(value: float, target: str) -> str:
    op, num, unit = target.split()
    scale = {"s": 1.0, "ms": 1e-3, "MB": 1.0, "MB/s": 1e6, "GB/s": 1e9}[unit]
    want = float(num) * scale
    ok = value <= want if op == "<=" else value >= want
    return "yes" if ok else "no"


def _rows(m: dict[str, list[float]], ns: argparse.Namespace) -> list[dict[str, str]]:
    rows = []

    def row(test: str, lazy: str, fmt: Callable[[float], str], local: str | None, ratio_higher_better: bool,
            target: str) -> None:
        lv = _med(m[lazy])
        r = {"test": test, "lazy (median)": fmt(lv), "lazy spread": _spread(m[lazy], fmt)}
        if local is not None:
            bv = _med(m[local])
            r["local (median)"] = fmt(bv)
            r["local spread"] = _spread(m[local], fmt)
            r["lazy / local"] = f"{lv / bv:.2f}x" if bv else ""
        r["target"] = target
        r["met"] = _met(lv, target)
        rows.append(r)

    row(f"mount {ns.files}-entry layer (local: tar -xzf)", "mount", _secs, "tar", False, TARGETS["mount"])
    row("layer server RSS after mount", "rss", _mb, None, False, TARGETS["rss"])
    if m["rss_read"]:
        row(f"layer server RSS after reading {ns.read_files} files", "rss_read", _mb, None, False, TARGETS["rss"])
        row(f"... and {REST_SEC:g} s later, at rest", "rss_rest", _mb, None, False, TARGETS["rss"])
    row(f"first read, {ns.big_mb} MB file, cold span cache", "first", _rate, "l_first", True, TARGETS["first"])
    row("second read (page cache)", "second", _rate, "l_second", True, TARGETS["second"])
    row("read after drop_caches (span cache on disk)", "dropped", _rate, "l_dropped", True, TARGETS["dropped"])
    row("first byte of a cold small file", "byte", _ms, "l_byte", False, TARGETS["byte"])
    return rows


def _notes(ns: argparse.Namespace) -> str:
    return (f"medians of {ns.runs} interleaved runs; spread = min-max; registry on loopback; state and "
            f"extractions on one tmpfs; local = the extracted layer on that tmpfs (drop_caches cannot evict "
            f"tmpfs, so its reads are memory reads)")


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    if os.geteuid() != 0:
        print("soci-bench fs: needs root (tmpfs, mount -t fuse.soci, drop_caches)", file=sys.stderr)
        return 2
    try:
        rows, notes = run(ns, log=lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("soci-bench fs: interrupted; everything was cleaned up", file=sys.stderr)
        return 130
    print(to_markdown(rows))
    print(f"\n{notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
