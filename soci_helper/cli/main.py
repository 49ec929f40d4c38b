"""The `soci` command: parses arguments, calls the library, prints results.

Building the parser imports no command's machinery; each command imports what it needs when it runs, so
`soci image rpull` does not load the index builder and `soci --help` loads neither gRPC nor `requests`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..ztoc.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE
from .common import add_platform_flags, add_registry_flags, configure_logging, default_root, run_main
from .image import add_image_parser
from .mounts import add_mounts_parser
from .push import add_index_pull_parser, add_push_parser

Command = Callable[[argparse.Namespace, Any], int]


def _add_build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--span-size", type=int, default=DEFAULT_SPAN_SIZE, help="uncompressed bytes per span")
    p.add_argument(
        "--head-span", type=int, default=0, metavar="BYTES",
        help="give each file of at least --span-size bytes a first span of about this many bytes of its own, "
        "so reading a big file's head fetches that much instead of a whole span (0, the default: upstream's layout)",
    )
    p.add_argument(
        "--min-layer-size", type=int, default=DEFAULT_MIN_LAYER_SIZE, help="layers smaller than this get no zTOC"
    )
    p.add_argument("-f", "--force", action="store_true", help="rebuild zTOCs that already exist")
    p.add_argument(
        "--prefetch-file", action="append", default=[], metavar="PATH",
        help="a file to fetch when its layer is mounted (repeatable; kept in order): a prefetch artifact per layer",
    )
    p.add_argument(
        "--prefetch-files-json", metavar="FILE",
        help="a JSON array of paths, or of {\"path\", \"offset\", \"length\"} segments in the order a workload "
        "reads them, to prefetch like --prefetch-file (after those)",
    )


def _artifacts(name: str) -> Command:
    """Command `name` of .artifacts, imported only when it runs."""
    def run(args: argparse.Namespace, store: Any) -> int:
        from . import artifacts

        func: Command = getattr(artifacts, name)
        return func(args, store)

    run.__name__ = name
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soci", description="Build, inspect and use SOCI indexes for lazy container starts."
    )
    p.add_argument("--version", action="version", version=f"soci (soci-helper) {__version__}")
    p.add_argument("--root", default=default_root(), help="store root (default: %(default)s)")
    p.add_argument("-a", "--address", default="/run/containerd/containerd.sock", help="containerd socket")
    p.add_argument("-n", "--namespace", default="default", help="containerd namespace")
    p.add_argument("--config", help="config.toml for registry retries, timeouts and mirrors "
                   "(default: /etc/soci-snapshotter-grpc/config.toml when it exists)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("create", help="build zTOCs and a SOCI index (v1) for an image into the local store")
    c.add_argument("image", metavar="IMAGE")
    _add_build_flags(c)
    add_platform_flags(c)
    add_registry_flags(c)
    c.set_defaults(func=_artifacts("cmd_create"))

    c = sub.add_parser("convert", help="build a SOCI-enabled image (index v2) from SRC and write it to DST")
    c.add_argument("source", metavar="SRC")
    c.add_argument("dest", metavar="DST")
    _add_build_flags(c)
    add_platform_flags(c)
    add_registry_flags(c)
    c.set_defaults(func=_artifacts("cmd_convert"))

    add_push_parser(sub)

    idx = sub.add_parser("index", help="manage SOCI indexes in the local store")
    isub = idx.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    c = isub.add_parser("list", aliases=["ls"], help="list indexes")
    c.add_argument("--ref", help="only indexes built for this image reference")
    c.add_argument("-p", "--platform", action="append", default=[], help="only indexes for this platform")
    c.add_argument("-q", "--quiet", action="store_true", help="digests only")
    c.set_defaults(func=_artifacts("cmd_index_list"))
    c = isub.add_parser("info", help="print an index manifest")
    c.add_argument("digest", metavar="DIGEST")
    c.set_defaults(func=_artifacts("cmd_index_info"))
    c = isub.add_parser("rm", aliases=["remove"], help="remove indexes and the zTOCs only they use")
    c.add_argument("digests", metavar="DIGEST", nargs="+")
    c.set_defaults(func=_artifacts("cmd_index_rm"))
    add_index_pull_parser(isub)

    zt = sub.add_parser("ztoc", help="inspect zTOCs in the local store")
    zsub = zt.add_subparsers(dest="ztoc_command", metavar="COMMAND", required=True)
    c = zsub.add_parser("list", aliases=["ls"], help="list zTOCs")
    c.add_argument("--ztoc-digest", help="only this zTOC")
    c.add_argument("--layer-digest", help="only zTOCs of this layer")
    c.add_argument("-q", "--quiet", action="store_true", help="digests only")
    c.set_defaults(func=_artifacts("cmd_ztoc_list"))
    c = zsub.add_parser("info", help="print a zTOC's contents as JSON")
    c.add_argument("digest", metavar="DIGEST")
    c.set_defaults(func=_artifacts("cmd_ztoc_info"))
    c = zsub.add_parser("get-file", help="extract one file of a layer, fetching only the spans it needs")
    c.add_argument("digest", metavar="DIGEST")
    c.add_argument("path", metavar="PATH")
    c.add_argument("-o", "--output", help="write to FILE instead of stdout")
    c.add_argument("--image", help="image (registry, oci:DIR, oci-archive:FILE) holding the layer; "
                   "default: where the zTOC was built from")
    add_registry_flags(c)
    c.set_defaults(func=_artifacts("cmd_ztoc_get_file"))

    pf = sub.add_parser("prefetch", help="inspect the prefetch artifacts of the local store's indexes")
    psub = pf.add_subparsers(dest="prefetch_command", metavar="COMMAND", required=True)
    c = psub.add_parser("list", aliases=["ls"], help="list prefetch artifacts with their layer and span count")
    c.add_argument("-q", "--quiet", action="store_true", help="digests only")
    c.set_defaults(func=_artifacts("cmd_prefetch_list"))
    c = psub.add_parser("info", help="print a prefetch artifact's span ranges and priorities as JSON")
    c.add_argument("digest", metavar="DIGEST")
    c.set_defaults(func=_artifacts("cmd_prefetch_info"))

    c = sub.add_parser("rebuild-db", help="rebuild the artifacts database from the blobs in the store")
    c.set_defaults(func=_artifacts("cmd_rebuild_db"))

    add_mounts_parser(sub)
    add_image_parser(sub)
    return p


def _run(argv: Sequence[str] | None) -> tuple[int, argparse.Namespace | None]:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("debug" if args.debug else "warning")

    def run() -> int:
        func: Command = args.func
        if not getattr(args, "needs_store", True):
            return func(args, None)
        from ..index.ops import Store

        store = Store.open(args.root)
        try:
            return func(args, store)
        finally:
            store.close()

    return run_main("soci", run), args


def main(argv: Sequence[str] | None = None) -> int:
    return _run(argv)[0]


def entry() -> None:
    """The `soci` command: main(), then exit. A command marked quick_exit leaves without finalising the
    interpreter once its output is flushed: after `image rpull` has finished (all it writes is in containerd
    by then), tearing down gRPC and requests took another 60 to 130 ms, which a script waiting for the pull
    waits for too."""
    code, args = _run(None)
    if getattr(args, "quick_exit", False):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
