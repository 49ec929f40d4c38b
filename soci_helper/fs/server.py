"""The layer server: one detached process per lazy layer mount; it serves the FUSE mount until unmounted."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import SociError, ZtocError
from ..ztoc.model import Ztoc
from ..ztoc.zinfo import GzipZinfo
from .stats import MountStats

log = logging.getLogger("soci.layer-server")

MODULE = "soci_helper.fs.server"  # what `soci mounts` looks for in a server's command line
STATS_PERIOD_SEC = 2.0
# A server lets go of spans and freed heap after one whole quiet stats period, so this long after its last
# read it is surely at rest (the period it went quiet in, the quiet one, and a margin).
AT_REST_AFTER_SEC = 2 * STATS_PERIOD_SEC + 1.0
# The kernel's read-ahead on the mount. It is also the read-around of every page fault on a mapped file: a
# program's loader maps dozens of shared libraries, and each fault pulled in this much around it, spans
# and all. 1 MiB against 4 MiB (interleaved runs): ffmpeg's lazy start fetched 112 MB instead of 127, while
# sequential reads of a 100 MB file stayed as fast (215 vs 206 MB/s cold, 1.49 vs 1.24 GB/s from the span
# cache); 512 KiB fetched 107 MB but read from the span cache at 0.97 GB/s.
READ_AHEAD_KB = 1024
THREAD_STACK = 512 << 10
# Compressed spans (a MiB or so) and read buffers (128 KiB and up) are made and freed all the time. By default
# glibc gives each back to the kernel on free (mmap, or a heap trim) and the next one is page-faulted in afresh:
# a 160 KiB pread costs 28 us so against 13 us with freed heap kept. (When the server still kept 4 MiB spans
# in memory, keeping up to this much took reads after drop_caches from 822 to 1133 MB/s; 16 MiB did worse.)
# The at-rest trim hands it all back.
MALLOC_KEEP = 32 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
BASE_OPTIONS = ("subtype=soci", "ro", "allow_other", "default_permissions")
# Generic mount flags libfuse accepts and that make sense on a read-only layer.
PASSTHROUGH_OPTIONS = frozenset({"nosuid", "nodev", "noexec", "suid", "dev", "exec", "noatime", "atime",
                                 "relatime", "nodiratime", "diratime"})


def mounts_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "mounts"


def state_path(root: str | os.PathLike[str], mount_id: str) -> Path:
    return mounts_dir(root) / f"{mount_id}.json"


def log_path(root: str | os.PathLike[str], mount_id: str) -> Path:
    return mounts_dir(root) / f"{mount_id}.log"


def reads_path(root: str | os.PathLike[str], mount_id: str) -> Path:
    """What the mount's readers read ([fuse] record_reads); not *.json, which names state files."""
    return mounts_dir(root) / f"{mount_id}.reads"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class ServerSpec:
    """Everything a layer server needs; none of it is secret (credentials are looked up by the server)."""

    root: str
    mount_id: str
    mountpoint: str
    source: str  # HOST/REPO@LAYER_DIGEST as given to mount; also the mount's fsname
    host: str
    repository: str
    layer_digest: str
    ztoc_digest: str
    image_ref: str = ""
    plain_http: bool = False
    config_path: str | None = None
    extra_options: tuple[str, ...] = ()
    prefetch_digest: str = ""  # a prefetch artifact in the store: spans to fetch as soon as the mount serves

    def to_argv(self) -> list[str]:
        argv = ["--root", self.root, "--id", self.mount_id, "--source", self.source, "--host", self.host,
                "--repository", self.repository, "--layer", self.layer_digest, "--ztoc", self.ztoc_digest]
        if self.image_ref:
            argv += ["--image-ref", self.image_ref]
        if self.plain_http:
            argv.append("--plain-http")
        if self.config_path:
            argv += ["--config", self.config_path]
        if self.prefetch_digest:
            argv += ["--prefetch", self.prefetch_digest]
        for opt in self.extra_options:
            argv += ["--option", opt]
        argv.append(self.mountpoint)
        return argv


def mount_options(spec: ServerSpec) -> set[str]:
    # libfuse splits options on commas; a source with one would corrupt the option string.
    fsname = spec.source.replace(",", "_").replace("\\", "_")
    return {f"fsname={fsname}", *BASE_OPTIONS, *spec.extra_options}


# --- where layer bytes come from ----------------------------------------------


def make_fetch(spec: ServerSpec) -> Callable[[int, int], bytes]:
    """Compressed-blob range reads: the local content store when it holds the layer, else the registry."""
    from ..store.content import ContentStore

    store = ContentStore(spec.root)
    if store.has(spec.layer_digest):
        path = store.path(spec.layer_digest)

        def local(offset: int, length: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        log.info("layer %s is in the local store; reading it from there", spec.layer_digest)
        return local
    from ..oci.auth import resolve_credentials
    from ..oci.registry import RegistryOptions, get_client

    creds = resolve_credentials(spec.host)
    client = get_client(spec.host, RegistryOptions(plain_http=spec.plain_http, credentials=creds))
    repo, digest = spec.repository, spec.layer_digest
    # One HEAD now turns an unreachable registry or a missing blob into a failed mount, not EIO later.
    if client.head_blob(repo, digest) is None:
        raise SociError(f"layer {digest} is not in {spec.host}/{repo}")

    def remote(offset: int, length: int) -> bytes:
        return client.get_blob_range(repo, digest, offset, length)

    return remote


def make_reader(spec: ServerSpec, ztoc: Ztoc, fetch: Callable[[int, int], bytes],
                cfg: config_mod.Config) -> tuple[Any, str]:
    """(reader, kind): the span manager over the on-disk span cache shared by every layer server."""
    from ..store.spancache import SpanCache
    from .spans import SpanManager

    return SpanManager(ztoc, spec.layer_digest, fetch, SpanCache(spec.root, cfg), cfg), "span-manager"


# --- the mount --------------------------------------------------------------


def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(_libc(), "malloc_trim", None)


def keep_freed_spans() -> bool:
    """Let malloc reuse freed span buffers instead of returning each to the kernel (see MALLOC_KEEP).

    False if this libc has no mallopt or refused one of the values."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    # One arena for all threads: malloc_trim gives back the top of the main arena only, so spans freed in the
    # fetch threads' own arenas stayed resident at rest (58 MB after reading 20,000 files; 43 MB with one).
    # Allocation is under the GIL here anyway, so the threads never contended for arenas.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MALLOC_KEEP), (_M_TRIM_THRESHOLD, MALLOC_KEEP))
    return all([bool(mallopt(param, value)) for param, value in settings])


def _settle_memory() -> None:
    """After the build: hand freed heap back to the system, and keep the collector off the long-lived data."""
    gc.collect()
    # Everything alive now lives as long as the mount; later collections need not scan it again.
    gc.freeze()
    trim = _malloc_trim()
    if trim is not None:
        # Imports and the set-up leave free but unreturned heap behind; RSS is what a host sees.
        trim(0)


def mountinfo_device(mountpoint: str) -> str | None:
    """`major:minor` of the FUSE mount at `mountpoint`, read without touching the mount itself."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        mp = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        sep = fields.index("-") if "-" in fields else -1
        if mp == mountpoint and sep > 0 and fields[sep + 1] == "fuse.soci":
            found = fields[2]  # the last one wins: it is the top of the mount stack
    return found


def _raise_read_ahead(mountpoint: str) -> None:
    dev = mountinfo_device(mountpoint)
    if dev is None:
        log.warning("could not find the mount's device; read-ahead left as is")
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.warning("could not raise read-ahead of %s: %s", dev, exc.strerror)


def _warn(msg: str) -> None:
    log.warning("%s", msg)


def _build_table(store: Any, ztoc_digest: str, on_warning: Callable[[str], None] = _warn,
                 data: bytes | None = None, decoded: Any = None) -> tuple[Any, Ztoc]:
    from .inodes import InodeTable

    # Straight from the flatbuffer into the table's arrays: no per-entry objects survive the build, and
    # the zTOC keeps only what spans need (its compression info). Forked decoding: every caller is a
    # single-threaded process (a builder child, or a server with no other thread while it builds).
    raw = store.read(ztoc_digest) if data is None else data
    return InodeTable.from_bytes(raw, on_warning=on_warning, forked=True, decoded=decoded)


def _windows_from_store(reader: Any, ztoc: Ztoc, store: Any, ztoc_digest: str) -> str:
    """Let the reader take checkpoint windows from the zTOC's file in the store rather than memory: 32 KiB
    a span, 3.3 of a server's 37 MB for the e2e sample's 107 spans, for one pread per span inflated.
    Where the windows are now, for the log."""
    zinfo = getattr(reader, "zinfo", None)
    if not isinstance(zinfo, GzipZinfo) or ztoc.checkpoints_offset < 0:
        return "in memory"
    try:
        fd = os.open(store.path(ztoc_digest), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("zTOC %s: keeping checkpoint windows in memory: %s", ztoc_digest, exc.strerror or exc)
        return "in memory"
    try:
        zinfo.windows_from_file(fd, ztoc.checkpoints_offset)
    except (OSError, ZtocError) as exc:
        os.close(fd)
        log.warning("zTOC %s: keeping checkpoint windows in memory: %s", ztoc_digest, exc)
        return "in memory"
    # The descriptor stays open for the server's life: the store may drop the file, the inode stays.
    ztoc.checkpoints = b""
    return "read from the zTOC file"


def _reap_quietly(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class _TableBuild:
    """The inode table built in a forked child and handed back pickled (arrays and blobs: compact and fast),
    with the warnings of the build, which the server logs.

    The child is the server's own, or one the mount helper started before the server (prebuild_table), whose
    pipe the server adopts. A spare builds in its own process, as does a server that cannot fork."""

    def __init__(self, pid: int, rfd: int, store: Any, ztoc_digest: str, where: str) -> None:
        self.pid, self.rfd, self.store, self.ztoc_digest, self.where = pid, rfd, store, ztoc_digest, where
        # An in-process build: the zTOC and its decoded header, read by start() to know forks_later.
        self.data: bytes | None = None
        self.decoded: Any = None
        # Whether result() will fork (to decode a big table's entries): no other thread may run then.
        self.forks_later = False

    @classmethod
    def start(cls, store: Any, ztoc_digest: str, fork: bool = True) -> _TableBuild:
        forked = _fork_builder(store, ztoc_digest) if fork else None
        if forked is not None:
            return cls(*forked, store, ztoc_digest, "in a child")
        from ..ztoc import codec
        from ..ztoc import forked as forked_decode

        build = cls(-1, -1, store, ztoc_digest, "in process")
        build.data = store.read(ztoc_digest)
        build.decoded = codec.decode_raw(build.data)
        build.forks_later = forked_decode.decodes_in_child(build.data, build.decoded[0])
        return build

    @classmethod
    def adopt(cls, rfd: int, store: Any, ztoc_digest: str) -> _TableBuild:
        return cls(-1, rfd, store, ztoc_digest, "by the mount helper's child")

    def result(self) -> tuple[Any, Ztoc]:
        if self.rfd < 0:
            data, decoded, self.data, self.decoded = self.data, self.decoded, None, None
            return _build_table(self.store, self.ztoc_digest, data=data, decoded=decoded)
        import pickle

        from .inodes import InodeTable

        try:
            with os.fdopen(self.rfd, "rb") as f:
                self.rfd = -1
                try:
                    ok, value, warnings = pickle.load(f)
                except (EOFError, pickle.UnpicklingError, ValueError) as exc:
                    raise SociError(f"building the inode table failed: the builder died ({exc})") from None
        except BaseException:
            self._reap()
            raise
        if self.pid > 0:
            # The builder still tears down its heap (tens of ms for a big layer): reap it off the mount's path.
            pid, self.pid = self.pid, -1
            threading.Thread(target=_reap_quietly, args=(pid,), name="table-reaper", daemon=True).start()
        for msg in warnings:
            _warn(msg)
        if not ok:
            raise value
        state, head = value
        table = InodeTable.__new__(InodeTable)
        table.__dict__.update(state)
        table.warn = _warn
        return table, head

    def abandon(self) -> None:
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1
        if self.pid > 0:
            _reap_quietly(self.pid)
            self.pid = -1


def _fork_builder(store: Any, ztoc_digest: str) -> tuple[int, int] | None:
    """(child pid, read end of its pipe), or None when no child could be made."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # leave without running any of the parent's exit handlers
        code = 1
        try:
            os.close(r)
            _send_table(w, store, ztoc_digest)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _send_table(w: int, store: Any, ztoc_digest: str) -> None:
    import pickle

    warnings: list[str] = []
    try:
        table, head = _build_table(store, ztoc_digest, warnings.append)
        state = {k: v for k, v in table.__dict__.items() if k != "warn"}
        payload = pickle.dumps((True, (state, head), warnings), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - the server raises it as if it had built the table itself
        try:
            payload = pickle.dumps((False, exc, warnings), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - an exception that does not pickle still reaches the server
            payload = pickle.dumps((False, SociError(f"{type(exc).__name__}: {exc}"), warnings))
    with os.fdopen(w, "wb") as f:
        f.write(payload)


def prebuild_table(root: str, ztoc_digest: str) -> tuple[int, int] | None:
    """Start building a layer's inode table before its server exists: (builder pid, read end of the pipe that
    will carry the table: pass it to the server as --table-fd), or None if no builder could be started.

    Only from a single-threaded process (the mount helper): the builder is a fork, the caller's child."""
    from ..store.content import ContentStore

    return _fork_builder(ContentStore(root), ztoc_digest)


class LayerServer:
    """Loads the zTOC, mounts, reports readiness, serves, and keeps its state file current."""

    def __init__(self, spec: ServerSpec, ready_fd: int | None = None, table_fd: int | None = None,
                 imported: bool = False) -> None:
        self.spec = spec
        self.ready_fd = ready_fd
        self.table_fd = table_fd  # a table being built by the mount helper's child, to read instead of building
        self.imported = imported  # a spare: FUSE, trio and the registry client are loaded already
        self.started_at = _now()
        self.state = "starting"
        self.reader: Any = None
        self.reader_kind = ""
        self.fs: Any = None
        self.entries = 0
        self.mounted = False
        self.terminated = False
        self.error = ""
        self.memory_released = 0  # quiet periods after which spans and freed buffers were let go

    # --- readiness pipe ----------------------------------------------------

    def _tell_parent(self, message: str) -> None:
        if self.ready_fd is None:
            return
        fd, self.ready_fd = self.ready_fd, None
        try:
            os.write(fd, (message.replace("\n", " ") + "\n").encode())
        except OSError:
            pass  # the helper gave up waiting; the state file still says what happened
        finally:
            os.close(fd)

    # --- state file ---------------------------------------------------------

    def write_state(self) -> None:
        stats = getattr(self.reader, "stats", None) or MountStats()
        extra: dict[str, Any] = {
            "id": self.spec.mount_id,
            "pid": os.getpid(),
            "mountpoint": self.spec.mountpoint,
            "source": self.spec.source,
            "layer_digest": self.spec.layer_digest,
            "ztoc_digest": self.spec.ztoc_digest,
            "image_ref": self.spec.image_ref,
            "state": self.state,
            "started_at": self.started_at,
            "updated_at": _now(),
            "entries": self.entries,
            "reader": self.reader_kind,
            "read_errors": getattr(self.fs, "read_errors", 0),
            "memory_released": self.memory_released,
        }
        if self.error:
            extra["error"] = self.error
        try:
            stats.write_atomically(state_path(self.spec.root, self.spec.mount_id), **extra)
        except OSError as exc:
            log.warning("could not write state file: %s", exc)

    # --- life cycle ----------------------------------------------------------

    def prepare(self) -> None:
        from ..store.content import ContentStore

        t0 = time.monotonic()
        cfg = config_mod.load(self.spec.config_path) if self.spec.config_path else config_mod.load()
        store = ContentStore(self.spec.root)
        # The table builds in a child while this process imports FUSE and the registry client and checks
        # the blob: the two overlap on a second core, and the build's transient objects never fragment
        # this long-lived process's heap. A spare has nothing left to import: the child would only add a
        # fork and a copy (the e2e sample's 2,025 entries: 70 ms in a child, 30 ms here), and a big table's
        # entries are still decoded on a second core (see ztoc/forked.py).
        if self.table_fd is not None:
            fd, self.table_fd = self.table_fd, None
            build = _TableBuild.adopt(fd, store, self.spec.ztoc_digest)
        else:
            build = _TableBuild.start(store, self.spec.ztoc_digest, fork=not self.imported)
        import pyfuse3

        from .layerfs import LayerFS

        if build.forks_later:
            try:
                fetch = make_fetch(self.spec)
            except BaseException:
                build.abandon()
                raise
            table, ztoc = build.result()
        else:
            # The blob's HEAD (two round trips on a fresh connection: 40 ms on a 10 ms link) runs on a thread
            # while the table builds here or in the child.
            table, ztoc, fetch = self._build_while_checking(build)
        self.entries = len(table)
        self.reader, self.reader_kind = make_reader(self.spec, ztoc, fetch, cfg)
        windows = _windows_from_store(self.reader, ztoc, store, self.spec.ztoc_digest)
        note = getattr(self.reader, "note_activity", None)
        self.fs = LayerFS(table, self.reader, cfg.fuse, on_read=note)
        if cfg.fuse.record_reads:
            from .record import ReadRecorder

            self.fs.recorder = ReadRecorder()
        _settle_memory()
        log.info("loaded zTOC %s: %d inodes, %d spans, in %.3f s (%s reader, table built %s, windows %s)",
                 self.spec.ztoc_digest, self.entries, len(ztoc.span_digests), time.monotonic() - t0,
                 self.reader_kind, build.where, windows)
        if not os.path.isdir(self.spec.mountpoint):
            raise SociError(f"mount point {self.spec.mountpoint} is not a directory")
        pyfuse3.init(self.fs, self.spec.mountpoint, mount_options(self.spec))
        self.mounted = True
        log.info("mounted %s at %s", self.spec.source, self.spec.mountpoint)

    def _build_while_checking(self, build: _TableBuild) -> tuple[Any, Ztoc, Callable[[int, int], bytes]]:
        got: list[Callable[[int, int], bytes]] = []
        failed: list[BaseException] = []

        def check() -> None:
            try:
                got.append(make_fetch(self.spec))
            except BaseException as exc:  # noqa: BLE001 - raised again on the server's own thread
                failed.append(exc)

        checker = threading.Thread(target=check, name="blob-check", daemon=True)
        checker.start()
        try:
            table, ztoc = build.result()
        finally:
            checker.join()
        if failed:
            raise failed[0]
        return table, ztoc, got[0]

    async def _announce_when_ready(self) -> None:
        import trio

        # The stat only returns once the FUSE loop answers, so readiness means the mount really serves.
        await trio.to_thread.run_sync(os.stat, self.spec.mountpoint)
        _raise_read_ahead(self.spec.mountpoint)
        self.state = "alive"
        self.write_state()
        self._start_prefetch()
        start_bg = getattr(self.reader, "start_background_fetch", None)
        if start_bg is not None:
            start_bg(self.fs.table.regular_files)
        self._tell_parent("ok")
        log.info("ready")

    def save_reads(self) -> None:
        rec = self.fs.recorder if self.fs is not None else None
        if rec is None or not rec.changed:
            return
        try:
            rec.save(reads_path(self.spec.root, self.spec.mount_id), self.fs.table,
                     {"id": self.spec.mount_id, "layer": self.spec.layer_digest, "image_ref": self.spec.image_ref})
        except OSError as exc:
            log.warning("could not save the read record: %s", exc.strerror or exc)

    def _start_prefetch(self) -> None:
        """Fetch the prefetch artifact's spans in its order. A missing or bad artifact costs the prefetch, not
        the mount: a layer mounted again after a restart must not fail because its artifact was removed since."""
        start = getattr(self.reader, "start_prefetch", None)
        if not self.spec.prefetch_digest or start is None:
            return
        from ..store.content import ContentStore
        from ..ztoc import prefetch

        try:
            data = ContentStore(self.spec.root).read(self.spec.prefetch_digest)
            order = prefetch.fetch_order(prefetch.decode(data, self.reader.num_spans - 1))
        except SociError as exc:
            log.warning("prefetch artifact %s not used: %s", self.spec.prefetch_digest, exc)
            return
        log.info("prefetching %d spans listed by %s", len(order), self.spec.prefetch_digest)
        start(order)

    async def _publish(self) -> None:
        import trio

        trim = _malloc_trim()
        seen = trimmed = self._activity()
        while True:
            await trio.sleep(STATS_PERIOD_SEC)
            self.write_state()
            self.save_reads()
            now = self._activity()
            if now == seen and now != trimmed:
                # Quiet for a whole period after reads or fetches: drop the inflated spans kept for reads in
                # progress (the disk cache has them), and hand malloc's freed buffers back (megabytes each,
                # held by its arenas), so a resting server's RSS is what it needs. Only when quiet: the
                # refaults never slow a burst of reads.
                release = getattr(self.reader, "release_memory", None)
                if release is not None:
                    release()
                if trim is not None:
                    trim(0)
                trimmed = now
                self.memory_released += 1
            seen = now

    def _activity(self) -> tuple[int, int]:
        stats = getattr(self.reader, "stats", None)
        return (stats.bytes_served, stats.bytes_fetched) if stats is not None else (0, 0)

    async def _on_signals(self) -> None:
        import pyfuse3
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got signal %d; unmounting", signum)
                self.terminated = True
                pyfuse3.terminate()
                return

    async def _serve(self) -> None:
        import pyfuse3
        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announce_when_ready)
            nursery.start_soon(self._publish)
            nursery.start_soon(self._on_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    def run(self) -> int:
        self.write_state()  # early, so a helper that gives up waiting can find (and stop) this process
        try:
            # FUSE and trio are imported inside, after the table build has forked: the imports then
            # overlap with the build instead of delaying its start.
            self.prepare()
        except SociError as exc:
            return self._fail(str(exc))
        except OSError as exc:
            return self._fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
        except RuntimeError as exc:  # pyfuse3.init reports a failed mount this way
            return self._fail(f"mount failed: {exc}")
        import pyfuse3
        import trio

        code = 0
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - log it, then still unmount and record the state
            log.error("server loop failed: %s: %s", type(exc).__name__, exc)
            self.error = f"{type(exc).__name__}: {exc}"
            self.terminated = True
            code = 1
        finally:
            self._tell_parent("error: the server stopped before the mount answered")
            try:
                # After an external umount the session is gone and unmounting again would fail.
                pyfuse3.close(unmount=self.terminated)
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the FUSE session: %s", exc)
            if self.reader is not None and hasattr(self.reader, "close"):
                self.reader.close()
            self.state = "exited"
            self.write_state()
            self.save_reads()
            log.info("unmounted; server exits")
        return code

    def _fail(self, message: str) -> int:
        log.error("%s", message)
        self.error = message
        if self.mounted:
            import pyfuse3

            try:
                pyfuse3.close(unmount=True)
            except Exception:  # noqa: BLE001
                pass
        self.state = "failed"
        self.write_state()
        self._tell_parent(f"error: {message}")
        return 1


# --- process entry ----------------------------------------------------------------


def _parse(argv: Sequence[str]) -> tuple[ServerSpec, int | None, int | None, bool]:
    p = argparse.ArgumentParser(prog="soci-layer-server", description="Serve one lazily fetched layer over FUSE.")
    p.add_argument("--root", required=True)
    p.add_argument("--id", required=True, dest="mount_id")
    p.add_argument("--source", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--repository", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--ztoc", required=True)
    p.add_argument("--image-ref", default="")
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--config")
    p.add_argument("--prefetch", default="")
    p.add_argument("--option", action="append", default=[])
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--table-fd", type=int, help="read the inode table from this pipe instead of building it")
    p.add_argument("--detach", action="store_true", help="fork into a new session and return at once")
    p.add_argument("mountpoint")
    a = p.parse_args(argv)
    spec = ServerSpec(root=a.root, mount_id=a.mount_id, mountpoint=os.path.abspath(a.mountpoint), source=a.source,
                      host=a.host, repository=a.repository, layer_digest=a.layer, ztoc_digest=a.ztoc,
                      image_ref=a.image_ref, plain_http=a.plain_http, config_path=a.config,
                      extra_options=tuple(a.option), prefetch_digest=a.prefetch)
    return spec, a.ready_fd, a.table_fd, a.detach


def _setup_logging(spec: ServerSpec) -> None:
    mounts_dir(spec.root).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path(spec.root, spec.mount_id))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Request-level chatter from urllib3 would fill the log with one line per span fetch.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


SPARE_FLAG = "--spare"


def _warm_imports() -> None:
    """Everything a server imports on its way to serving, so that a spare has it loaded before it is asked."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from ..oci import auth, registry  # noqa: F401
    from ..store import content, spancache  # noqa: F401
    from . import inodes, layerfs, spans  # noqa: F401


def spare_argv(root: str, mount_id: str) -> list[str]:
    """A spare's arguments: the store root and mount id are on its command line, as on any server's."""
    return [SPARE_FLAG, "--root", root, "--id", mount_id]


def run_spare(argv: Sequence[str]) -> int:
    """A spare server: imported and waiting for its mount, so a mount does not wait for an interpreter.

    The pool that started it (see mount/spares.py) writes one line, the server's arguments as a JSON list
    with the same root and mount id, then reads the server's answer from this process's stdout; stderr is
    already the mount's log. End of input: not needed, exit."""
    p = argparse.ArgumentParser(prog="soci-layer-server --spare")
    p.add_argument("--root", required=True)
    p.add_argument("--id", required=True, dest="mount_id")
    mine = p.parse_args(argv)
    _warm_imports()
    # Collected and frozen while waiting: the collection after the mount's table build (see _settle_memory)
    # then scans only what the build made, not every imported module: about 20 ms less on the mount's path.
    gc.collect()
    gc.freeze()
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    args = json.loads(line)
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        print("soci-layer-server: error: a spare server got a malformed request", file=sys.stderr)
        return 1
    ready = os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return main([*args, "--ready-fd", str(ready), "--detach"], spare=(mine.root, mine.mount_id))


def main(argv: Sequence[str] | None = None, spare: tuple[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == [SPARE_FLAG]:
        return run_spare(args[1:])
    spec, ready_fd, table_fd, detach = _parse(args)
    if spare is not None and (spec.root, spec.mount_id) != spare:
        # What is on this process's command line is how it is found again: it must be this mount's.
        print(f"soci-layer-server: error: spare {spare[1]} of {spare[0]} asked to serve mount {spec.mount_id} "
              f"of {spec.root}", file=sys.stderr)
        return 1
    if detach:
        # Second fork: the helper reaps the first child at once; the server is then nobody's child but
        # init's, in its own session, so the helper (or the daemon) exiting never takes it down.
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Every thread here (span fetchers, trio's worker threads, background fetch) runs shallow Python and
    # C code; glibc's default 8 MiB stacks only cost address space and page-table churn per thread.
    threading.stack_size(THREAD_STACK)
    keep_freed_spans()
    _setup_logging(spec)
    log.info("starting (pid %d) for %s at %s", os.getpid(), spec.source, spec.mountpoint)
    return LayerServer(spec, ready_fd, table_fd, imported=spare is not None).run()


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_server_process(pid: int, mount_id: str) -> bool:
    """Whether `pid` is still the layer server of `mount_id` (not a reused pid)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if stat_fields[0] == "Z":
            return False
    except (OSError, IndexError):
        return False
    return MODULE.encode() in cmd and mount_id.encode() in cmd


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as exc:
        print(f"soci-layer-server: error: {os.strerror(exc.errno or errno.EIO)}", file=sys.stderr)
        sys.exit(1)
