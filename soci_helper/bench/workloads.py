"""Benchmark workload images: a debootstrap minbase layer plus one application layer each, cached and resumable.

Application layers are made with overlayfs: the base tree is the lower directory, apt-get runs in a
chroot of the merged view, and the upper directory then holds exactly what changed, with the kernel's
own whiteouts (char 0/0 devices, `trusted.overlay.opaque` directories). Turning those into OCI
whiteouts (`.wh.NAME`, `.wh..wh..opq`) is a small, exact translation; no tree diffing is needed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from ..sandbox.images import tar_of, write_image

SUITE = "bookworm"
# Bump when the way images are built changes, so that cached images are rebuilt.
RECIPE = "1"
TAG = "latest"


@dataclass(frozen=True)
class Workload:
    """One image and the command whose `ready` line on stdout means the application is up."""

    name: str
    kind: str  # "debian": base + apt layer; "busybox": one busybox layer; "headers": base + data layer
    command: tuple[str, ...]
    ready: str = "ready"
    packages: tuple[str, ...] = ()
    files: int = 0
    file_mb: int = 0
    about: str = field(default="", compare=False)

    def key(self) -> str:
        """Cache key: what the image is made of (package list or data shape), not how it is used."""
        parts = [RECIPE, SUITE, self.kind, *sorted(self.packages), str(self.files), str(self.file_mb)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]

    @property
    def uses_debootstrap(self) -> bool:
        return self.kind != "busybox"


_SH = "/bin/sh"
WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("busybox", "busybox", ("/bin/busybox", "sh", "-c", "echo ready"),
             about="busybox-static alone, one tiny layer"),
    Workload("python-scipy", "debian", ("python3", "-c", "import numpy, scipy, pandas; print('ready')"),
             packages=("python3-numpy", "python3-scipy", "python3-pandas"),
             about="python3 imports numpy, scipy and pandas"),
    Workload("node", "debian", ("node", "-e", "console.log('ready ' + process.version)"),
             packages=("nodejs",), about="node runs a one-line script"),
    Workload("ffmpeg", "debian", (_SH, "-c",
             "ffmpeg -v error -f lavfi -i testsrc=duration=2:size=320x240:rate=25 -c:v mpeg4 /tmp/in.avi"
             " && ffmpeg -v error -i /tmp/in.avi -c:v libx264 -preset ultrafast /tmp/out.mp4"
             " && echo ready"),
             packages=("ffmpeg",), about="ffmpeg makes a 2 s test clip and transcodes it to H.264"),
    Workload("redis", "debian", (_SH, "-c",
             "redis-server --daemonize yes --save '' --appendonly no >/dev/null"
             " && until redis-cli ping 2>/dev/null | grep -q PONG; do sleep 0.02; done"
             " && echo ready && redis-cli shutdown nosave >/dev/null 2>&1; true"),
             packages=("redis-server",), about="redis-server answers PING"),
    Workload("model-headers", "headers", (_SH, "-c",
             "for f in /models/*.bin; do head -c 4096 \"$f\" >/dev/null || exit 1; done; echo ready"),
             files=50, file_mb=20, about="reads the first 4 KiB of 50 files of 20 MB random data"),
]}

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("soci-bench")) / "suite"


# --- the machine's Debian mirror -------------------------------------------------


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    cur: dict[str, str] = {}
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                yield cur
            cur = {}
            continue
        if line[0].isspace() or ":" not in line:
            continue
        k, v = line.split(":", 1)
        cur[k.strip().lower()] = v.strip()


def debian_mirror(suite: str = SUITE) -> tuple[str, str | None]:
    """(mirror URI, keyring or None) of the first configured `deb` source serving `suite`, read from apt."""
    found: list[tuple[str, str | None]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with suppress(OSError):
            for st in _deb822_stanzas(Path(path).read_text()):
                if "deb" in st.get("types", "").split() and suite in st.get("suites", "").split() \
                        and st.get("enabled", "yes") != "no":
                    for uri in st.get("uris", "").split():
                        found.append((uri, st.get("signed-by") or None))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if not words or words[0] != "deb":
                    continue
                opts: dict[str, str] = {}
                words = words[1:]
                if words and words[0].startswith("["):
                    while words:
                        w = words.pop(0).strip("[]")
                        if "=" in w:
                            k, v = w.split("=", 1)
                            opts[k] = v
                        if "]" in line and not any("]" in x for x in words):
                            break
                if len(words) >= 2 and words[1] == suite:
                    found.append((words[0], opts.get("signed-by")))
    if not found:
        raise RuntimeError(f"no apt source for Debian {suite} is configured (/etc/apt/sources.list*)")
    uri, keyring = found[0]
    if keyring and not os.path.isfile(keyring):
        keyring = None
    return uri, keyring


# --- building blocks --------------------------------------------------------------


def _run_logged(cmd: list[str], log_file: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> None:
    with open(log_file, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                           timeout=timeout)
    if r.returncode != 0:
        tail = log_file.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:3])} failed ({r.returncode}), see {log_file}:\n{tail}")


def _top_level(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def _base_key() -> str:
    return hashlib.sha256(f"{RECIPE}\n{SUITE}\nminbase".encode()).hexdigest()[:12]


def build_base(cache: Path, log: Log = _stderr_log) -> Path:
    """`debootstrap --variant=minbase` into a cached tree and its layer tar; returns the directory."""
    d = cache / f"base-{SUITE}-{_base_key()}"
    if (d / "done").exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rootfs = d / "rootfs"
    mirror, keyring = debian_mirror()
    cmd = ["debootstrap", "--variant=minbase"]
    if keyring:
        cmd.append(f"--keyring={keyring}")
    cmd += [SUITE, str(rootfs), mirror]
    log(f"  base: debootstrap --variant=minbase {SUITE} (log: {d / 'build.log'})")
    t0 = time.monotonic()
    _run_logged(cmd, d / "build.log")
    # Nothing of the build machine belongs in the image.
    for name in ("etc/resolv.conf", "etc/hostname"):
        p = rootfs / name
        if p.is_file() and not p.is_symlink():
            p.write_text("")
    for p in (rootfs / "var/cache/apt").glob("*.bin"):
        p.unlink()
    log(f"  base: tar ({time.monotonic() - t0:.0f} s so far)")
    tar_of(d / "layer.tar", str(rootfs), _top_level(rootfs))
    (d / "done").write_text("")
    return d


def _whiteout_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.size, ti.mtime = 0o644, 0, 0
    ti.uname = ti.gname = ""
    return ti


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def upper_to_layer(upper: Path, dst: Path) -> None:
    """Write an overlayfs upper directory as an OCI layer tar: kernel whiteouts become OCI whiteouts."""
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tf:

        def walk(rel: str) -> None:
            full = os.path.join(upper, rel) if rel else str(upper)
            for name in sorted(os.listdir(full)):
                r = f"{rel}/{name}" if rel else name
                p = os.path.join(full, name)
                st = os.lstat(p)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    parent = os.path.dirname(r)
                    tf.addfile(_whiteout_info(f"{parent}/.wh.{name}" if parent else f".wh.{name}"))
                    continue
                ti = tf.gettarinfo(p, arcname=r)
                # Numeric ids only: the image's users are not this machine's.
                ti.uname = ti.gname = ""
                if ti.isreg():
                    with open(p, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
                if stat.S_ISDIR(st.st_mode):
                    if _is_opaque(p):
                        tf.addfile(_whiteout_info(f"{r}/.wh..wh..opq"))
                    walk(r)

        walk("")


@contextmanager
def _mounted(cmds: list[tuple[list[str], str]]) -> Iterator[None]:
    """Run mount commands in order; unmount their targets in reverse on the way out, whatever happened."""
    done: list[str] = []
    try:
        for cmd, target in cmds:
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            r = subprocess.run(["umount", target], capture_output=True, timeout=60)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)


def _overlay_options(lower: Path, upper: Path, work: Path) -> list[str]:
    base = f"lowerdir={lower},upperdir={upper},workdir={work}"
    # metacopy would leave metadata-only copies in the upper dir; redirect_dir renames we cannot express.
    return [base + ",metacopy=off,redirect_dir=off", base]


def build_debian_layer(base: Path, w: Workload, out: Path, log: Log) -> Path:
    """apt-get install w.packages on top of the base tree; returns the application layer tar."""
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    upper, owork, merged = work / "upper", work / "owork", work / "merged"
    for p in (upper, owork, merged):
        p.mkdir(parents=True)
    last_err = ""
    for opts in _overlay_options(base / "rootfs", upper, owork):
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            break
        last_err = r.stderr
    else:
        raise RuntimeError(f"overlay mount failed: {last_err.strip()}")
    try:
        resolv = merged / "etc/resolv.conf"
        mounts = [
            (["mount", "-t", "proc", "proc", str(merged / "proc")], str(merged / "proc")),
            (["mount", "--bind", "/dev", str(merged / "dev")], str(merged / "dev")),
            (["mount", "--bind", "/etc/resolv.conf", str(resolv)], str(resolv)),
        ]
        with _mounted(mounts):
            # Postinst scripts must not start services (redis) inside the build chroot.
            policy = merged / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8",
                   "HOME": "/root"}
            chroot = ["chroot", str(merged)]
            log_file = out / "build.log"
            log(f"  {w.name}: apt-get update (log: {log_file})")
            _run_logged([*chroot, "apt-get", "update", "-q"], log_file, env)
            log(f"  {w.name}: apt-get install {' '.join(w.packages)}")
            _run_logged([*chroot, "apt-get", "install", "-y", "-q", "--no-install-recommends", *w.packages],
                        log_file, env)
            _run_logged([*chroot, "apt-get", "clean"], log_file, env)
            policy.unlink()
            for p in (merged / "var/lib/apt/lists").glob("*"):
                if p.is_file() and p.name != "lock":
                    p.unlink()
    finally:
        r2 = subprocess.run(["umount", str(merged)], capture_output=True, timeout=60)
        if r2.returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True, timeout=60)
    log(f"  {w.name}: layer tar from the overlay's upper directory")
    tar = out / "app.tar"
    upper_to_layer(upper, tar)
    shutil.rmtree(work, ignore_errors=True)
    return tar


def build_headers_layer(w: Workload, out: Path, log: Log) -> Path:
    """w.files files of w.file_mb MB of random data under /models (random so that gzip cannot shrink them)."""
    tree = out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "models").mkdir(parents=True)
    chunk = 1 << 20
    for i in range(w.files):
        with open(tree / "models" / f"shard-{i:03d}.bin", "wb") as f:
            for _ in range(w.file_mb):
                f.write(os.urandom(chunk))
    log(f"  {w.name}: {w.files} x {w.file_mb} MB written; tar")
    tar = tar_of(out / "app.tar", str(tree), ["models"])
    shutil.rmtree(tree)
    return tar


def busybox_binary() -> Path:
    """The machine's static busybox (Debian's busybox-static package)."""
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.isfile(p):
            return Path(p)
    raise RuntimeError("busybox (Debian package busybox-static) is not installed")


def build_busybox_layer(out: Path) -> Path:
    tree = out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(busybox_binary(), tree / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "head", "ls"):
        os.symlink("busybox", tree / "bin" / applet)
    tar = tar_of(out / "app.tar", str(tree), ["bin"])
    shutil.rmtree(tree)
    return tar


def _compression() -> str:
    # pigz writes one ordinary gzip stream, on both cores: the big layers build much faster.
    return "pigz" if shutil.which("pigz") else "gzip"


@dataclass
class BuiltImage:
    workload: Workload
    layout: Path
    layers: list[dict[str, int | str]]

    @property
    def compressed_bytes(self) -> int:
        return sum(int(x["size"]) for x in self.layers)


def image_dir(cache: Path, w: Workload) -> Path:
    return cache / f"{w.name}-{w.key()}"


def load_built(cache: Path, w: Workload) -> BuiltImage | None:
    d = image_dir(cache, w)
    try:
        meta = json.loads((d / "image.json").read_text())
    except (OSError, ValueError):
        return None
    return BuiltImage(w, d / "layout", meta["layers"])


def build(w: Workload, cache: Path | None = None, log: Log = _stderr_log) -> BuiltImage:
    """The workload's OCI layout (tag `latest`), built once and cached; an interrupted build restarts its step."""
    cache = cache or cache_root()
    have = load_built(cache, w)
    if have is not None:
        return have
    d = image_dir(cache, w)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"building {w.name} ({w.about}) into {d}")
    tars: list[Path | tuple[Path, str]] = []
    if w.kind == "busybox":
        tars.append((build_busybox_layer(d), _compression()))
    else:
        base = build_base(cache, log)
        tars.append((base / "layer.tar", _compression()))
        app = build_debian_layer(base, w, d, log) if w.kind == "debian" else build_headers_layer(w, d, log)
        tars.append((app, _compression()))
    layout = d / "layout"
    shutil.rmtree(layout, ignore_errors=True)
    log(f"  {w.name}: compressing {len(tars)} layer(s)")
    desc = write_image(layout, tars, TAG)
    manifest = json.loads((layout / "blobs" / "sha256" / desc.digest.split(":", 1)[1]).read_bytes())
    layers = [{"digest": x["digest"], "size": x["size"]} for x in manifest["layers"]]
    # The base tar stays (shared); the application tar is in the layout now.
    for item in tars:
        tar = item[0] if isinstance(item, tuple) else item
        if tar.parent == d:
            tar.unlink(missing_ok=True)
    (d / "image.json").write_text(json.dumps({"workload": w.name, "key": w.key(), "layers": layers,
                                              "build_seconds": round(time.monotonic() - t0, 1)}))
    mb = sum(int(x["size"]) for x in layers) / 1e6
    log(f"  {w.name}: done in {time.monotonic() - t0:.0f} s, {len(layers)} layer(s), {mb:.1f} MB compressed")
    return BuiltImage(w, layout, layers)
