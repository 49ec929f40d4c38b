"""The commands on the local store's SOCI artifacts: create, convert, index list|info|rm, ztoc list|info|get-file,
rebuild-db. `soci` imports this module only to run one of them (see main.py)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from ..errors import NotFound, SociError
from ..index import ops
from ..index import soci_index as si
from ..index.build import BuildOptions, IndexBuilder, IndexResult
from ..index.convert import convert
from ..index.loadorder import item_for_path, read_document
from ..oci.source import open_source, select_images
from ..store.artifacts import TYPE_INDEX, TYPE_ZTOC
from ..store.atomic import write_atomically
from ..ztoc import prefetch as prefetch_mod
from ..ztoc.info import describe
from ..ztoc.reader import LayerReader
from .common import source_options
from .progress import Progress


def _build_options(args: argparse.Namespace, artifact_type: str) -> BuildOptions:
    if args.span_size <= 0:
        raise SociError("--span-size must be positive")
    if args.head_span < 0:
        raise SociError("--head-span must not be negative")
    prefetch = [item_for_path(p) for p in args.prefetch_file]
    if args.prefetch_files_json:
        prefetch += read_document(args.prefetch_files_json)
    return BuildOptions(
        span_size=args.span_size, head_span=args.head_span, min_layer_size=args.min_layer_size, force=args.force,
        artifact_type=artifact_type, prefetch=prefetch,
    )


def _print_prefetches(result: IndexResult, requested: int) -> None:
    for p in result.prefetches:
        print(p.line())
    if result.prefetch_missing:
        print(f"prefetch: {len(result.prefetch_missing)} of {requested} paths are in no indexed layer")


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
    # Options first: a bad prefetch list fails before anything is fetched or written.
    build = _build_options(args, si.ARTIFACT_TYPE_V1)
    opts = source_options(args)
    source = open_source(args.image, opts)
    images = select_images(source, opts)
    builder = IndexBuilder(store.content, store.db, build)
    bars = _LayerBars()

    def on_layer(res) -> None:  # type: ignore[no-untyped-def]
        bars.close()
        print(res.line(), flush=True)

    for image in images:
        result = builder.build_index(source, image, source.ref, on_layer, bars)
        bars.close()
        _print_prefetches(result, len(build.prefetch))
        print(f"soci index {result.digest} for {image.descriptor.digest} ({image.platform_string()})")
    return 0


def cmd_convert(args: argparse.Namespace, store: ops.Store) -> int:
    build = _build_options(args, si.ARTIFACT_TYPE_V2)
    opts = source_options(args)
    bars = _LayerBars()

    def on_layer(res) -> None:  # type: ignore[no-untyped-def]
        bars.close()
        print(res.line(), flush=True)

    def on_index(res: IndexResult) -> None:
        bars.close()
        _print_prefetches(res, len(build.prefetch))

    result = convert(args.source, args.dest, store, opts, build, on_layer, bars, on_index)
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
        write_atomically(args.output, data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def _prefetch_digest(store: ops.Store, prefix: str) -> tuple[si.PrefetchRef, str]:
    hexp = prefix.removeprefix("sha256:")
    hits = [(p, idx) for p, idx in store.prefetches() if hexp and p.digest[7:].startswith(hexp)]
    if not hits:
        raise NotFound(f"no prefetch artifact {prefix} in the local store")
    if len(hits) > 1:
        raise SociError(f"{prefix} names {len(hits)} prefetch artifacts; give more of the digest")
    return hits[0]


def cmd_prefetch_list(args: argparse.Namespace, store: ops.Store) -> int:
    found = store.prefetches()
    if args.quiet:
        for p, _ in found:
            print(p.digest)
        return 0
    rows = [["DIGEST", "SIZE", "LAYER DIGEST", "SPANS", "INDEX"]]
    for p, index in found:
        spans = len(prefetch_mod.fetch_order(store.load_prefetch(p.digest)))
        rows.append([p.digest, str(p.size), p.layer_digest, str(spans), index])
    _table(rows)
    return 0


def cmd_prefetch_info(args: argparse.Namespace, store: ops.Store) -> int:
    ref, index = _prefetch_digest(store, args.digest)
    items = store.load_prefetch(ref.digest)
    doc = {
        "digest": ref.digest, "size": ref.size, "layer_digest": ref.layer_digest, "index": index,
        "version": prefetch_mod.PREFETCH_ARTIFACT_VERSION,
        "prefetch_spans": [{"start_span": p.start, "end_span": p.end, "priority": p.priority} for p in items],
        "total_spans": len(prefetch_mod.fetch_order(items)),
    }
    print(json.dumps(doc, indent=2))
    return 0


def cmd_rebuild_db(args: argparse.Namespace, store: ops.Store) -> int:
    n_idx, n_ztoc = store.rebuild_db()
    print(f"rebuilt artifacts database: {n_idx} indexes, {n_ztoc} ztocs")
    return 0
