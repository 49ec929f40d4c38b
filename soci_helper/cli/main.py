"""The `soci` command: parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from .. import __version__
from ..errors import SociError
from ..index import ops
from ..index import soci_index as si
from ..index.build import BuildOptions, IndexBuilder
from ..index.convert import convert
from ..oci.source import open_source, select_images
from ..store.artifacts import TYPE_INDEX, TYPE_ZTOC
from ..ztoc.info import describe
from ..ztoc.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE
from ..ztoc.reader import LayerReader
from .common import add_platform_flags, add_registry_flags, configure_logging, default_root, run_main, source_options
from .image import add_image_parser
from .mounts import add_mounts_parser
from .progress import Progress
from .push import add_index_pull_parser, add_push_parser

log = logging.getLogger("soci")


def _add_build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--span-size", type=int, default=DEFAULT_SPAN_SIZE, help="uncompressed bytes per span")
    p.add_argument(
        "--min-layer-size", type=int, default=DEFAULT_MIN_LAYER_SIZE, help="layers smaller than this get no zTOC"
    )
    p.add_argument("-f", "--force", action="store_true", help="rebuild zTOCs that already exist")


def _build_options(args: argparse.Namespace, artifact_type: str) -> BuildOptions:
    if args.span_size <= 0:
        raise SociError("--span-size must be positive")
    return BuildOptions(
        span_size=args.span_size, min_layer_size=args.min_layer_size, force=args.force, artifact_type=artifact_type
    )


class _LayerBars:
    """One progress bar per layer being read, on a terminal only."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.current = ""

    def __call__(self, layer, done: int) -> None:  # type: ignore[no-untyped-def]
        if layer.digest != self.current:
            self.close()
            self.current = layer.digest
            self.bar = Progress(f"layer {layer.digest[7:19]}", layer.size)
        assert self.bar is not None
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_create(args: argparse.Namespace, store: ops.Store) -> int:
    opts = source_options(args)
    source = open_source(args.image, opts)
    images = select_images(source, opts)
    builder = IndexBuilder(store.content, store.db, _build_options(args, si.ARTIFACT_TYPE_V1))
    bars = _LayerBars()

    def on_layer(res) -> None:  # type: ignore[no-untyped-def]
        bars.close()
        print(res.line(), flush=True)

    for image in images:
        result = builder.build_index(source, image, source.ref, on_layer, bars)
        bars.close()
        print(f"soci index {result.digest} for {image.descriptor.digest} ({image.platform_string()})")
    return 0


def cmd_convert(args: argparse.Namespace, store: ops.Store) -> int:
    opts = source_options(args)
    bars = _LayerBars()

    def on_layer(res) -> None:  # type: ignore[no-untyped-def]
        bars.close()
        print(res.line(), flush=True)

    result = convert(args.source, args.dest, store, opts, _build_options(args, si.ARTIFACT_TYPE_V2), on_layer, bars)
    bars.close()
    print(f"converted {args.source} -> {args.dest}: image index {result.digest}")
    return 0


def _ago(created: str) -> str:
    try:
        t = datetime.strptime(created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return "n/a"
    secs = int((datetime.now(UTC) - t).total_seconds())
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    return (f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s") + " ago"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_index_list(args: argparse.Namespace, store: ops.Store) -> int:
    entries = store.db.indexes()
    if args.ref:
        entries = [e for e in entries if e.image_ref == args.ref]
    if args.platform:
        entries = [e for e in entries if e.platform in args.platform]
    if args.quiet:
        for e in entries:
            print(e.digest)
        return 0
    rows = [["DIGEST", "SIZE", "IMAGE REF", "PLATFORM", "MEDIA TYPE", "MANIFEST VERSION", "CREATED"]]
    for e in entries:
        version = "v2" if e.artifact_type == si.ARTIFACT_TYPE_V2 else "v1"
        rows.append([e.digest, str(e.size), e.image_ref, e.platform, e.media_type, version, _ago(e.created_at)])
    _table(rows)
    return 0


def cmd_index_info(args: argparse.Namespace, store: ops.Store) -> int:
    digest = store.resolve_digest(args.digest, TYPE_INDEX)
    raw = store.content.read(digest)
    si.parse(raw, f"SOCI index {digest}")
    print(json.dumps(json.loads(raw), indent=2))
    return 0


def cmd_index_rm(args: argparse.Namespace, store: ops.Store) -> int:
    for d in args.digests:
        for removed in store.remove_index(store.resolve_digest(d, TYPE_INDEX)):
            print(f"removed {removed}")
    return 0


def cmd_ztoc_list(args: argparse.Namespace, store: ops.Store) -> int:
    entries = store.db.ztocs()
    if args.ztoc_digest:
        entries = [e for e in entries if e.digest == args.ztoc_digest]
    if args.layer_digest:
        entries = [e for e in entries if e.original_digest == args.layer_digest]
    if args.quiet:
        for e in entries:
            print(e.digest)
        return 0
    rows = [["DIGEST", "SIZE", "LAYER DIGEST"]]
    rows += [[e.digest, str(e.size), e.original_digest] for e in entries]
    _table(rows)
    return 0


def cmd_ztoc_info(args: argparse.Namespace, store: ops.Store) -> int:
    digest = store.resolve_digest(args.digest, TYPE_ZTOC)
    ztoc = store.load_ztoc(digest)
    print(json.dumps(describe(ztoc, store.content.size(digest)), indent=2, ensure_ascii=False))
    return 0


def cmd_ztoc_get_file(args: argparse.Namespace, store: ops.Store) -> int:
    digest = store.resolve_digest(args.digest, TYPE_ZTOC)
    ztoc = store.load_ztoc(digest)
    fetch = ops.layer_fetcher(store, digest, args.image, source_options(args))
    data = LayerReader(ztoc, fetch, f"layer of ztoc {digest}").read_file(args.path)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.output)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def cmd_rebuild_db(args: argparse.Namespace, store: ops.Store) -> int:
    n_idx, n_ztoc = store.rebuild_db()
    print(f"rebuilt artifacts database: {n_idx} indexes, {n_ztoc} ztocs")
    return 0


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
    c.set_defaults(func=cmd_create)

    c = sub.add_parser("convert", help="build a SOCI-enabled image (index v2) from SRC and write it to DST")
    c.add_argument("source", metavar="SRC")
    c.add_argument("dest", metavar="DST")
    _add_build_flags(c)
    add_platform_flags(c)
    add_registry_flags(c)
    c.set_defaults(func=cmd_convert)

    add_push_parser(sub)

    idx = sub.add_parser("index", help="manage SOCI indexes in the local store")
    isub = idx.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    c = isub.add_parser("list", aliases=["ls"], help="list indexes")
    c.add_argument("--ref", help="only indexes built for this image reference")
    c.add_argument("-p", "--platform", action="append", default=[], help="only indexes for this platform")
    c.add_argument("-q", "--quiet", action="store_true", help="digests only")
    c.set_defaults(func=cmd_index_list)
    c = isub.add_parser("info", help="print an index manifest")
    c.add_argument("digest", metavar="DIGEST")
    c.set_defaults(func=cmd_index_info)
    c = isub.add_parser("rm", aliases=["remove"], help="remove indexes and the zTOCs only they use")
    c.add_argument("digests", metavar="DIGEST", nargs="+")
    c.set_defaults(func=cmd_index_rm)
    add_index_pull_parser(isub)

    zt = sub.add_parser("ztoc", help="inspect zTOCs in the local store")
    zsub = zt.add_subparsers(dest="ztoc_command", metavar="COMMAND", required=True)
    c = zsub.add_parser("list", aliases=["ls"], help="list zTOCs")
    c.add_argument("--ztoc-digest", help="only this zTOC")
    c.add_argument("--layer-digest", help="only zTOCs of this layer")
    c.add_argument("-q", "--quiet", action="store_true", help="digests only")
    c.set_defaults(func=cmd_ztoc_list)
    c = zsub.add_parser("info", help="print a zTOC's contents as JSON")
    c.add_argument("digest", metavar="DIGEST")
    c.set_defaults(func=cmd_ztoc_info)
    c = zsub.add_parser("get-file", help="extract one file of a layer, fetching only the spans it needs")
    c.add_argument("digest", metavar="DIGEST")
    c.add_argument("path", metavar="PATH")
    c.add_argument("-o", "--output", help="write to FILE instead of stdout")
    c.add_argument("--image", help="image (registry, oci:DIR, oci-archive:FILE) holding the layer; "
                   "default: where the zTOC was built from")
    add_registry_flags(c)
    c.set_defaults(func=cmd_ztoc_get_file)

    c = sub.add_parser("rebuild-db", help="rebuild the artifacts database from the blobs in the store")
    c.set_defaults(func=cmd_rebuild_db)

    add_mounts_parser(sub)
    add_image_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("debug" if args.debug else "warning")

    def run() -> int:
        store = ops.Store.open(args.root)
        try:
            func: Callable[[argparse.Namespace, ops.Store], int] = args.func
            return func(args, store)
        finally:
            store.close()

    return run_main("soci", run)


if __name__ == "__main__":
    sys.exit(main())
