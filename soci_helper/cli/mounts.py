"""`soci mounts [list|cleanup]`: the lazy layer mounts of this store root, their health and counters."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALIVE, DEAD, GONE, STARTING = "alive", "dead", "gone", "starting"
_COUNTERS = ("bytes_served", "bytes_fetched", "spans_fetched", "cache_hits", "cache_misses", "verify_failures",
             "read_errors", "read_wait_us")


@dataclass(slots=True)
class MountInfo:
    mount_id: str
    state: str  # alive: server answering; dead: mounted, server gone; gone: not mounted any more
    why: str
    doc: dict[str, Any]
    state_file: Path


def _stat_with_timeout(path: str, timeout: float = 2.0) -> int | None:
    """errno of statfs(path), 0 when it works, None when it hangs (a stuck server must not hang us too)."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)  # statfs always reaches the server; stat may be answered from the attr cache
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or errno.EIO)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def inspect(root: str) -> list[MountInfo]:
    # Here, not at the top: `soci` builds this command's parser for every command it runs.
    from ..fs import server as srv
    from ..mount.helper import soci_mounts_at

    out: list[MountInfo] = []
    mdir = srv.mounts_dir(root)
    for path in sorted(mdir.glob("*.json")) if mdir.is_dir() else []:
        doc = srv.read_state(path)
        if doc is None:
            continue
        mount_id = str(doc.get("id") or path.stem)
        mountpoint = str(doc.get("mountpoint", ""))
        pid = doc.get("pid")
        server_up = isinstance(pid, int) and srv.is_server_process(pid, mount_id)
        mounted = bool(mountpoint) and soci_mounts_at(mountpoint) > 0
        if doc.get("state") == "starting" and server_up:
            out.append(MountInfo(mount_id, STARTING, "server starting", doc, path))
            continue
        if not mounted:
            why = "not mounted" + ("" if not server_up else " (server still running)")
            out.append(MountInfo(mount_id, GONE, why, doc, path))
            continue
        if not server_up:
            err = _stat_with_timeout(mountpoint)
            why = os.strerror(err) if err else "server process is gone"
            out.append(MountInfo(mount_id, DEAD, why, doc, path))
            continue
        err = _stat_with_timeout(mountpoint)
        if err is None:
            out.append(MountInfo(mount_id, ALIVE, "server not answering within 2 s", doc, path))
        elif err:
            out.append(MountInfo(mount_id, DEAD, os.strerror(err), doc, path))
        else:
            out.append(MountInfo(mount_id, ALIVE, "", doc, path))
    return out


def cmd_mounts(args: argparse.Namespace, store: object = None) -> int:
    infos = inspect(args.root)
    if getattr(args, "json", False):
        rows = []
        for m in infos:
            row = {k: m.doc.get(k) for k in ("id", "pid", "mountpoint", "source", "layer_digest", "ztoc_digest",
                                             "image_ref", "started_at", "updated_at", "entries", "reader")}
            row["state"] = m.state
            row["why"] = m.why
            row["counters"] = {k: m.doc.get(k, 0) for k in _COUNTERS}
            rows.append(row)
        print(json.dumps(rows, indent=2))
        return 0
    if not infos:
        print("no mounts")
        return 0
    table = [["MOUNTPOINT", "STATE", "LAYER", "IMAGE", "SERVED", "FETCHED", "SPANS", "HITS", "ERRORS", "ID"]]
    for m in infos:
        d = m.doc
        state = f"{m.state} ({m.why})" if m.why else m.state
        table.append([
            str(d.get("mountpoint", "")), state, str(d.get("layer_digest", ""))[:19],
            str(d.get("image_ref") or d.get("source", "")), str(d.get("bytes_served", 0)),
            str(d.get("bytes_fetched", 0)), str(d.get("spans_fetched", 0)), str(d.get("cache_hits", 0)),
            str(d.get("read_errors", 0) + d.get("verify_failures", 0)), m.mount_id,
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_mounts_cleanup(args: argparse.Namespace, store: object = None) -> int:
    """Unmount dead mounts and forget mounts that are gone; alive mounts are left alone."""
    from ..fs import server as srv
    from ..mount.helper import force_unmount

    failed = 0
    for m in inspect(args.root):
        if m.state in (ALIVE, STARTING):
            continue
        mountpoint = str(m.doc.get("mountpoint", ""))
        if m.state == DEAD:
            if not force_unmount(mountpoint):
                print(f"could not unmount {mountpoint} ({m.mount_id})", file=sys.stderr)
                failed += 1
                continue
            print(f"unmounted dead mount {mountpoint} ({m.mount_id})")
        else:
            print(f"removed state of {m.mount_id} ({mountpoint}: {m.why})")
        m.state_file.unlink(missing_ok=True)
        srv.log_path(args.root, m.mount_id).unlink(missing_ok=True)
        srv.reads_path(args.root, m.mount_id).unlink(missing_ok=True)
    return 1 if failed else 0


def cmd_mounts_reads(args: argparse.Namespace, store: object = None) -> int:
    """The load-order document of what the mounts' readers read ([fuse] record_reads), to stdout or a file."""
    from ..fs import server as srv
    from ..fs.record import load_order

    mdir = srv.mounts_dir(args.root)
    records = sorted(mdir.glob("*.reads")) if mdir.is_dir() else []
    if not records:
        print(f"soci: no read records under {mdir} (set record_reads = true in [fuse] and run the workload)",
              file=sys.stderr)
        return 1
    text = json.dumps(load_order(records), indent=1) + "\n"
    if args.output and args.output != "-":
        from ..store.atomic import write_atomically

        write_atomically(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def add_mounts_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `mounts` (and `mounts cleanup`) to the `soci` command's subparsers."""
    p = sub.add_parser("mounts", help="list lazy layer mounts (alive or dead) and their counters")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_mounts, needs_store=False)  # it reads the layer servers' state files only
    msub = p.add_subparsers(dest="mounts_command", metavar="COMMAND")
    c = msub.add_parser("list", aliases=["ls"], help="list mounts (the default)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_mounts, needs_store=False)
    c = msub.add_parser("cleanup", help="unmount dead mounts and remove state of mounts that are gone")
    c.set_defaults(func=cmd_mounts_cleanup, needs_store=False)
    c = msub.add_parser("reads", help="print what the mounts' readers read, in order, as a load-order document "
                                      "for soci create --prefetch-files-json (needs [fuse] record_reads)")
    c.add_argument("-o", "--output", help="write it to this file instead of stdout")
    c.set_defaults(func=cmd_mounts_reads, needs_store=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone form: `python -m soci_helper.cli.mounts [--root DIR] [--json] [list|cleanup]`."""
    from .common import default_root, run_main

    p = argparse.ArgumentParser(prog="soci mounts")
    p.add_argument("--root", default=default_root())
    p.add_argument("--json", action="store_true")
    p.add_argument("action", nargs="?", choices=["list", "ls", "cleanup"], default="list")
    args = p.parse_args(argv)
    func = cmd_mounts_cleanup if args.action == "cleanup" else cmd_mounts
    return run_main("soci", lambda: func(args))


if __name__ == "__main__":
    sys.exit(main())
