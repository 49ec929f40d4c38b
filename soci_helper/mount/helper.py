"""mount.fuse.soci: parse what mount(8) passes, find the zTOC, start the layer server, wait until it serves."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as config_mod
from .. import digest as dg
from ..errors import NotFound, SociError
from ..fs import server as srv
from ..oci.reference import Reference, parse_reference
from .spares import Spare

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/soci-snapshotter-grpc"
FUSE_TYPE = "fuse.soci"
# After a mount succeeds, how long the helper waits for the table builder it started to finish exiting (it has
# sent the table by then; the rest is the kernel freeing its memory). A slower one is left to init.
BUILDER_EXIT_WAIT = 0.2
# Options mount(8) itself understands or adds; they mean nothing to a layer server.
_IGNORED = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
                      "nofail", "loud", "silent", "async", "sync", "rw"})


class MountError(SociError):
    """The layer could not be mounted; the message is the one line the user sees."""


@dataclass(slots=True)
class MountRequest:
    """A parsed `mount.fuse.soci SRC DIR -o OPTS` invocation."""

    source: str
    mountpoint: str
    reference: Reference
    layer_digest: str
    root: str = DEFAULT_ROOT
    plain_http: bool = False
    ztoc_digest: str | None = None
    image: str | None = None  # a tag or digest in the same repository, or a full image reference
    config_path: str | None = None
    prefetch_digest: str | None = None
    passthrough: list[str] = field(default_factory=list)
    verbose: bool = False
    fake: bool = False


@dataclass(slots=True)
class MountResult:
    mount_id: str
    mountpoint: str
    pid: int | None
    ztoc_digest: str
    state_file: Path
    log_file: Path


# --- parsing ------------------------------------------------------------------


def parse_source(source: str) -> tuple[Reference, str]:
    """HOST/REPO[:TAG]@LAYER_DIGEST -> (reference, layer digest)."""
    if "@" not in source:
        raise MountError(f"source {source!r} names no layer: want HOST/REPO@sha256:<layer digest>")
    ref = parse_reference(source)
    assert ref.digest is not None
    return ref, dg.validate(ref.digest)


def parse_options(text: str, req: MountRequest) -> None:
    for opt in (o.strip() for o in text.split(",")):
        if not opt:
            continue
        key, eq, value = opt.partition("=")
        if key == "ro" and not eq:
            continue
        if opt in _IGNORED or key.startswith("x-"):
            continue  # rw included: a layer is always mounted read-only
        if key == "plain_http" and not eq:
            req.plain_http = True
        elif key == "ztoc" and eq:
            req.ztoc_digest = dg.validate(value)
        elif key == "root" and eq and value:
            req.root = value
        elif key == "image" and eq and value:
            req.image = value
        elif key == "config" and eq and value:
            req.config_path = value
        elif key == "prefetch" and eq:
            req.prefetch_digest = dg.validate(value)
        elif opt in srv.PASSTHROUGH_OPTIONS:
            req.passthrough.append(opt)
        elif key in ("user", "password", "username", "creds", "auth", "token"):
            raise MountError(f"mount option {key!r} is refused: credentials come from the docker config, "
                             f"never from mount options (they are world-readable in /proc/mounts)")
        else:
            raise MountError(f"unknown mount option {opt!r} (known: ro, plain_http, ztoc=DIGEST, root=DIR, "
                             f"image=TAG|REF, config=FILE, prefetch=DIGEST)")


def parse_argv(argv: Sequence[str]) -> MountRequest:
    """What mount(8) runs: `SRC DIR [-o OPTS] [-v] [-n] [-s] [-f]` (`-o rw` when the user gave none)."""
    positional: list[str] = []
    opts: list[str] = []
    verbose = fake = False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o":
            if i + 1 >= len(args):
                raise MountError("-o needs an option list")
            opts.append(args[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif a in ("-v", "-n", "-s", "-f") or (a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("vnsf")):
            verbose = verbose or "v" in a
            fake = fake or "f" in a
        elif a.startswith("-") and a != "-":
            raise MountError(f"unknown flag {a!r}")
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise MountError("usage: mount.fuse.soci HOST/REPO@LAYER_DIGEST MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = positional
    ref, layer = parse_source(source)
    req = MountRequest(source=source, mountpoint=os.path.abspath(mountpoint), reference=ref, layer_digest=layer,
                       verbose=verbose, fake=fake)
    for o in opts:
        parse_options(o, req)
    return req


# --- finding the zTOC ----------------------------------------------------------------


def _image_ref(req: MountRequest) -> str | None:
    """The image to discover an index for: `image=` (tag, digest or full reference), else a tag in SRC."""
    ref = req.reference
    if req.image:
        if "/" in req.image:
            return req.image
        sep = "@" if req.image.startswith("sha256:") else ":"
        return f"{ref.name}{sep}{req.image}"
    if ref.tag:
        return f"{ref.name}:{ref.tag}"
    return None


def find_ztoc(req: MountRequest) -> tuple[str, str]:
    """(zTOC digest, image reference if known): the ztoc= option, the local store, then index discovery."""
    from ..index.ops import Store
    from ..store.artifacts import TYPE_ZTOC

    store = Store.open(req.root)
    try:
        if req.ztoc_digest:
            entry = store.db.get(req.ztoc_digest)
            if not store.content.has(req.ztoc_digest):
                raise NotFound(f"zTOC {req.ztoc_digest} is not in the local store at {req.root}")
            if entry is not None and entry.type == TYPE_ZTOC and entry.original_digest not in ("", req.layer_digest):
                raise MountError(f"zTOC {req.ztoc_digest} belongs to layer {entry.original_digest}, "
                                 f"not {req.layer_digest}")
            return req.ztoc_digest, entry.image_ref if entry else ""
        for entry in sorted(store.db.ztocs(req.layer_digest), key=lambda e: e.created_at, reverse=True):
            if store.content.has(entry.digest):
                return entry.digest, entry.image_ref
        image = _image_ref(req)
        if image is None:
            raise NotFound(f"no zTOC for layer {req.layer_digest} in the local store at {req.root}; build one "
                           f"(soci create), give -o ztoc=DIGEST, or name the image (HOST/REPO:TAG@LAYER or "
                           f"-o image=TAG) to find its SOCI index in the registry")
        return _discover(req, store, image), image
    finally:
        store.close()


def _discover(req: MountRequest, store: object, image: str) -> str:
    from ..index.discover import discover
    from ..oci.source import SourceOptions

    found = discover(image, SourceOptions(plain_http=req.plain_http), store,  # type: ignore[arg-type]
                     check_entries=False)  # the table build that follows checks the entries
    for z in found.index.ztocs:
        if z.layer_digest == req.layer_digest:
            p = found.index.prefetch_for_layer(req.layer_digest)
            if req.prefetch_digest is None and p is not None and p.digest in found.prefetches:
                req.prefetch_digest = p.digest
            return z.digest
    raise NotFound(f"the SOCI index {found.digest} of {image} has no zTOC for layer {req.layer_digest}")


# --- mount table ---------------------------------------------------------------------


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def soci_mounts_at(mountpoint: str) -> int:
    """How many fuse.soci mounts sit on `mountpoint` (from /proc/mounts, without touching the mounts)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return 0
    n = 0
    for line in lines:
        parts = line.split(" ")
        if len(parts) >= 3 and _unescape(parts[1]) == mountpoint and parts[2] == FUSE_TYPE:
            n += 1
    return n


def force_unmount(mountpoint: str) -> bool:
    """Detach a (possibly dead) FUSE mount; True when it is gone. Never blocks on a dead server."""
    for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        try:
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if soci_mounts_at(mountpoint) == 0:
            return True
    return soci_mounts_at(mountpoint) == 0


# --- starting the server -------------------------------------------------------------


def _last_log_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if " ERROR " in ln or "Error" in ln:
            return ln.split(": ", 1)[-1]
    return lines[-1] if lines else ""


def _kill_server(state_file: Path, mount_id: str) -> None:
    doc = srv.read_state(state_file) or {}
    pid = doc.get("pid")
    if isinstance(pid, int) and srv.is_server_process(pid, mount_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_ready(fd: int, timeout: float) -> str | None:
    """The server's one-line answer on the readiness pipe, "" on EOF, None on timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf.decode(errors="replace").strip()
        buf += chunk
        if b"\n" in buf:
            return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def _reap_builder(pid: int, kill: bool) -> None:
    """Reap the table builder: after a success it is exiting (its table is sent), so wait briefly and leave
    a slow one to init; after a failure it is of no use."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + (10.0 if kill else BUILDER_EXIT_WAIT)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.002)


def _spawn_and_wait(spec: srv.ServerSpec, table_args: list[str], table_fd: int | None, log_file: Path,
                    timeout: float) -> str | None:
    """Start a new server interpreter (it detaches) and wait for its answer; closes table_fd either way."""
    answer: str | None = None
    r = w = -1
    try:
        r, w = os.pipe()
        with open(log_file, "ab") as logf, open(os.devnull, "rb") as devnull:
            first = subprocess.Popen(
                [sys.executable, "-m", srv.MODULE, "--detach", "--ready-fd", str(w), *table_args, *spec.to_argv()],
                stdin=devnull, stdout=logf, stderr=logf, close_fds=True, cwd="/",
                pass_fds=(w,) if table_fd is None else (w, table_fd),
            )
        if table_fd is not None:
            os.close(table_fd)  # the server has it now; the builder must see only one reader
            table_fd = None
        os.close(w)
        w = -1
        first.wait()  # the intermediate child exits right after forking the server
        answer = _wait_ready(r, timeout)
    finally:
        if r >= 0:
            os.close(r)
        if w >= 0:
            os.close(w)
        if table_fd is not None:
            os.close(table_fd)
    return answer


def start_server(req: MountRequest, ztoc_digest: str, image_ref: str, timeout: float,
                 prebuild: bool = False, spare: Spare | None = None) -> MountResult:
    """Start the detached layer server and wait for its answer.

    prebuild: fork the inode table's builder here first (see mount()); its pipe goes to the server, and the
    builder is reaped here whatever happens.
    spare: a spare server (see spares.py) to become this mount's server instead of a new interpreter."""
    mount_id = spare.mount_id if spare is not None else os.urandom(6).hex()
    spec = srv.ServerSpec(root=os.path.abspath(req.root), mount_id=mount_id, mountpoint=req.mountpoint,
                          source=req.source, host=req.reference.registry, repository=req.reference.repository,
                          layer_digest=req.layer_digest, ztoc_digest=ztoc_digest, image_ref=image_ref,
                          plain_http=req.plain_http, config_path=req.config_path,
                          extra_options=tuple(req.passthrough), prefetch_digest=req.prefetch_digest or "")
    mdir = srv.mounts_dir(spec.root)
    mdir.mkdir(parents=True, exist_ok=True)
    state_file, log_file = srv.state_path(spec.root, mount_id), srv.log_path(spec.root, mount_id)
    before = soci_mounts_at(req.mountpoint)
    table = srv.prebuild_table(spec.root, ztoc_digest) if prebuild else None
    table_fd = table[1] if table is not None else None
    table_args = ["--table-fd", str(table_fd)] if table_fd is not None else []
    answer: str | None = None
    try:
        # A spare has no table pipe: a caller that prebuilds (the mount helper) has no spares anyway.
        ready = spare.hand_over(spec.to_argv()) if spare is not None and table_fd is None else None
        if ready is not None:
            assert spare is not None
            answer = _wait_ready(ready, timeout)
            spare.release()
        else:
            answer = _spawn_and_wait(spec, table_args, table_fd, log_file, timeout)
            table_fd = None
    finally:
        if table_fd is not None:
            os.close(table_fd)
        if table is not None:
            _reap_builder(table[0], kill=answer != "ok")
    if answer == "ok":
        doc = srv.read_state(state_file) or {}
        pid = doc.get("pid") if isinstance(doc.get("pid"), int) else None
        return MountResult(mount_id, req.mountpoint, pid, ztoc_digest, state_file, log_file)
    # Failed: make sure nothing is left behind, then say why in one line.
    _kill_server(state_file, mount_id)
    if soci_mounts_at(req.mountpoint) > before:
        force_unmount(req.mountpoint)
    if answer is None:
        why = f"the layer server did not answer within {timeout:g} s"
    elif answer.startswith("error: "):
        why = answer[len("error: "):]
    else:
        why = _last_log_line(log_file) or "the layer server exited without saying why"
    state_file.unlink(missing_ok=True)
    raise MountError(f"cannot mount {req.source} at {req.mountpoint}: {why} (log: {log_file})")


def mount(req: MountRequest, prebuild: bool = False, spare: Spare | None = None) -> MountResult | None:
    """Mount one layer; returns once the mount answers. Raises MountError (one line) on any failure.

    prebuild: start building the inode table while the server starts (a fork: single-threaded callers only).
    On a 100,000-entry layer this and the forked decoding together took 0.08 s off the mount."""
    try:
        if not os.path.isdir(req.mountpoint):
            raise MountError(f"mount point {req.mountpoint} does not exist or is not a directory")
        cfg = config_mod.load(req.config_path) if req.config_path else config_mod.load()
        ztoc_digest, image_ref = find_ztoc(req)
        if req.fake:
            return None
        return start_server(req, ztoc_digest, image_ref, float(cfg.mount_timeout_sec), prebuild, spare)
    finally:
        if spare is not None:
            spare.release()


def mount_layer(source: str, mountpoint: str | os.PathLike[str], options: str = "ro", *,
                root: str | None = None, spare: Spare | None = None) -> MountResult:
    """Library entry: the same as `mount -t fuse.soci SOURCE MOUNTPOINT -o OPTIONS`; `spare` (see spares.py)
    becomes the layer's server if given."""
    try:
        req = parse_argv([source, os.fspath(mountpoint), "-o", options])
    except BaseException:
        if spare is not None:
            spare.release()
        raise
    if root is not None:
        req.root = root
    result = mount(req, spare=spare)
    assert result is not None
    return result
