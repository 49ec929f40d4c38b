"""Builds zTOCs and SOCI indexes for image manifests into the local store (`soci create`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import __version__
from .. import digest as dg
from ..errors import LayerError, SociError
from ..oci import mediatype
from ..oci.manifest import Descriptor
from ..oci.source import ImageManifestInfo, ImageSource
from ..store.artifacts import TYPE_INDEX, TYPE_ZTOC, ArtifactEntry, ArtifactsDB
from ..store.content import ContentStore
from ..ztoc import codec
from ..ztoc import prefetch as pf
from ..ztoc.builder import GZIP, UNCOMPRESSED, build_ztoc
from ..ztoc.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE, Ztoc
from . import soci_index as si
from .loadorder import LoadOrderItem, plan_spans

log = logging.getLogger(__name__)

BUILD_TOOL = f"soci-helper v{__version__}"


@dataclass(slots=True)
class BuildOptions:
    span_size: int = DEFAULT_SPAN_SIZE
    head_span: int = 0  # see build_ztoc; 0 keeps upstream's checkpoint layout
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    force: bool = False
    build_tool: str = BUILD_TOOL
    artifact_type: str = si.ARTIFACT_TYPE_V1
    # Files or segments to prefetch at mount, in the order a workload reads them (empty: no prefetch artifacts).
    prefetch: list[LoadOrderItem] = field(default_factory=list)


@dataclass(slots=True)
class LayerResult:
    layer: Descriptor
    ztoc: si.ZtocRef | None = None
    skipped: str = ""  # why no zTOC was built, when none was
    reused: bool = False

    def line(self) -> str:
        if self.ztoc is not None:
            return f"layer {self.layer.digest} -> ztoc {self.ztoc.digest}" + (" (existing)" if self.reused else "")
        return f"layer {self.layer.digest} -> ztoc skipped ({self.skipped})"


@dataclass(slots=True)
class PrefetchResult:
    ref: si.PrefetchRef
    spans: int  # how many span ids the artifact lists

    def line(self) -> str:
        return f"layer {self.ref.layer_digest} -> prefetch {self.ref.digest} ({self.spans} spans)"


@dataclass(slots=True)
class IndexResult:
    image: ImageManifestInfo
    digest: str
    size: int
    index: si.SociIndex
    layers: list[LayerResult] = field(default_factory=list)
    prefetches: list[PrefetchResult] = field(default_factory=list)
    prefetch_missing: list[LoadOrderItem] = field(default_factory=list)  # in no indexed layer


# Progress hooks: (layer descriptor, compressed bytes done) while a layer is read.
LayerProgress = Callable[[Descriptor, int], None]


class IndexBuilder:
    """Turns image manifests into zTOCs and a SOCI index, sharing one store across processes."""

    def __init__(self, store: ContentStore, db: ArtifactsDB, opts: BuildOptions | None = None) -> None:
        self.store = store
        self.db = db
        self.opts = opts or BuildOptions()

    def build_layer(self, source: ImageSource, layer: Descriptor, progress: LayerProgress | None = None) -> LayerResult:
        kind = mediatype.layer_compression(layer.media_type).value
        if kind not in (GZIP, UNCOMPRESSED):
            reason = (
                f"{kind} layers are not indexable" if kind != "unknown" else f"unknown media type {layer.media_type}"
            )
            return LayerResult(layer, skipped=reason)
        if layer.size < self.opts.min_layer_size:
            return LayerResult(layer, skipped=f"size {layer.size} < min layer size {self.opts.min_layer_size}")
        span = self.opts.span_size
        head = self.opts.head_span
        # One builder per (layer, layout) at a time across processes; the others then reuse it.
        with self.store.lock(f"ztoc-build-{dg.hex_part(layer.digest)}-{span}-{head}"):
            if not self.opts.force:
                existing = self.db.find_ztoc(layer.digest, span, head)
                if existing is not None and self.store.has(existing.digest):
                    ref = si.ZtocRef(existing.digest, existing.size, layer.digest, layer.media_type, span)
                    return LayerResult(layer, ztoc=ref, reused=True)
            done = 0

            def on_chunk(n: int) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(layer, done)

            try:
                ztoc = build_ztoc(source.open_blob(layer), kind, span, self.opts.build_tool, on_chunk, head)
            except LayerError as exc:
                raise LayerError(f"layer {layer.digest}: {exc}") from None
            blob = codec.encode(ztoc)
            ztoc_digest = self.store.write(blob)
            self.db.put(
                ArtifactEntry(
                    digest=ztoc_digest,
                    type=TYPE_ZTOC,
                    size=len(blob),
                    original_digest=layer.digest,
                    image_ref=source.ref,
                    span_size=span,
                    media_type=si.ZTOC_MEDIA_TYPE,
                    head_span=head,
                )
            )
            log.info("built ztoc %s for layer %s (%d files, %d spans)", ztoc_digest, layer.digest,
                     len(ztoc.files), ztoc.max_span_id + 1)
            return LayerResult(layer, ztoc=si.ZtocRef(ztoc_digest, len(blob), layer.digest, layer.media_type, span))

    def build_index(
        self,
        source: ImageSource,
        image: ImageManifestInfo,
        image_ref: str = "",
        on_layer: Callable[[LayerResult], None] | None = None,
        progress: LayerProgress | None = None,
    ) -> IndexResult:
        results: list[LayerResult] = []
        for layer in image.manifest.layers:
            try:
                res = self.build_layer(source, layer, progress)
            except SociError:
                raise
            results.append(res)
            if on_layer is not None:
                on_layer(res)
        ztocs = [r.ztoc for r in results if r.ztoc is not None]
        prefetches, missing = self.build_prefetches(ztocs) if self.opts.prefetch else ([], [])
        v1 = self.opts.artifact_type == si.ARTIFACT_TYPE_V1
        subject = None
        if v1:
            d = image.descriptor
            subject = si.descriptor(d.media_type, d.digest, d.size)
        index = si.SociIndex(self.opts.artifact_type, ztocs, self.opts.build_tool, subject,
                             prefetches=[p.ref for p in prefetches])
        data = si.serialize(index)
        digest = self.store.write(data)
        # The image manifest and config are kept too, so rebuild-db can recover what an index is for.
        self.store.write(image.raw, image.descriptor.digest)
        cfg = image.manifest.config
        if cfg.size <= (4 << 20) and not self.store.has(cfg.digest):
            self.store.ingest(source.open_blob(cfg), cfg.digest)
        self.db.put(
            ArtifactEntry(
                digest=digest,
                type=TYPE_INDEX,
                size=len(data),
                original_digest=image.descriptor.digest,
                image_digest=image.descriptor.digest,
                image_ref=image_ref,
                platform=image.platform_string(),
                media_type=si.MEDIA_TYPE_OCI_MANIFEST,
                artifact_type=self.opts.artifact_type,
            )
        )
        return IndexResult(image, digest, len(data), index, results, prefetches, missing)

    def build_prefetches(self, ztocs: list[si.ZtocRef]) -> tuple[list[PrefetchResult], list[LoadOrderItem]]:
        """One prefetch artifact per layer the load order touches, written to the store, in layer order."""

        def loader(z: si.ZtocRef) -> Callable[[], Ztoc]:
            # From the store for built and reused zTOCs alike: build_layer keeps none in memory.
            return lambda: codec.decode(self.store.read(z.digest))

        items = self.opts.prefetch
        plan = plan_spans(items, [(z.layer_digest, loader(z)) for z in reversed(ztocs)])
        if plan.missing:
            # One line, not one per item: a recorded load order lists every segment read from a small,
            # unindexed layer.
            shown = list(dict.fromkeys(it.path for it in plan.missing))
            log.warning("prefetch: %d of %d items are in no indexed layer, skipped: %s%s", len(plan.missing),
                        len(items), ", ".join(shown[:5]), f" and {len(shown) - 5} more paths" if len(shown) > 5 else "")
        out: list[PrefetchResult] = []
        for z in ztocs:
            # pop: a layer listed twice in the manifest gets one artifact, as it has one zTOC.
            ids = plan.spans.pop(z.layer_digest, None)
            if not ids:
                continue
            blob = pf.encode(pf.from_order(ids))
            ref = si.PrefetchRef(self.store.write(blob), len(blob), z.layer_digest)
            out.append(PrefetchResult(ref, len(ids)))
        return out, plan.missing
