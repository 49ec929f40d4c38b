"""The `soci image rpull` command: argument parsing and output only.

The pull itself (gRPC, the registry client) is imported when the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import SociError
from .common import add_registry_flags, default_root, source_options
from .progress import Progress

if TYPE_CHECKING:
    from ..containerd.rpull import LayerResult
    from ..oci.manifest import Descriptor

# containerd.rpull.DEFAULT_SNAPSHOTTER, spelled out so that building the parser does not import gRPC (a test
# keeps the two equal).
DEFAULT_SNAPSHOTTER = "soci"


def add_image_parser(sub: Any) -> None:
    """Add `image rpull IMAGE` to the top-level sub-parsers."""
    img = sub.add_parser("image", help="pull images into containerd")
    isub = img.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    c = isub.add_parser(
        "rpull", help="pull an image into containerd through the soci snapshotter: layers with a SOCI index "
                      "are mounted lazily, the others are unpacked",
        description="Pull IMAGE into containerd (-a/--address, -n/--namespace) so that "
                    "`ctr run --snapshotter soci IMAGE ...` works right away.",
    )
    c.add_argument("image", metavar="IMAGE", help="registry reference (host/repo:tag or host/repo@sha256:...)")
    c.add_argument("--soci-index-digest", metavar="DIGEST",
                   help="the SOCI index the snapshotter should use (default: it discovers one)")
    c.add_argument("-p", "--platform", help="platform of a multi-platform image (default: this host's)")
    c.add_argument("--snapshotter", default=DEFAULT_SNAPSHOTTER,
                   help="containerd snapshotter to unpack into (default: %(default)s)")
    c.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the image record")
    add_registry_flags(c)
    # rpull writes to containerd, not to our store; quick_exit: see cli.main.entry
    c.set_defaults(func=cmd_rpull, needs_store=False, quick_exit=True)


def _short(digest: str) -> str:
    return digest[:19]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


class _Output:
    """One line per layer on stdout; a download bar on stderr when it is a terminal."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.bar: Progress | None = None

    def layer_started(self, index: int, total: int, layer: Descriptor) -> None:
        self._close_bar()

    def download_progress(self, index: int, layer: Descriptor, done: int) -> None:
        if self.bar is None:
            self.bar = Progress(f"layer {index + 1} {_short(layer.digest)}", layer.size)
        self.bar.update(done)

    def layer_done(self, result: LayerResult, total: int) -> None:
        self._close_bar()
        d = result.descriptor
        extra = f", {_mb(result.downloaded)} downloaded" if result.downloaded else ""
        state = f"{result.state} {result.detail}" if result.detail else result.state
        print(f"layer {result.index + 1}/{total} {_short(d.digest)} ({_mb(d.size)}): {state}{extra}",
              file=self.out, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SociError(f"--label wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_rpull(args: argparse.Namespace, store: Any = None) -> int:
    from ..mount.hints import send

    # First, before the imports below: the snapshotter starts a layer server and looks the index up meanwhile.
    send(args.root or default_root(), args.image, args.soci_index_digest or "")
    from ..containerd.rpull import RpullOptions, rpull

    opts = RpullOptions(snapshotter=args.snapshotter, index_digest=args.soci_index_digest, platform=args.platform,
                        image_labels=_labels(args.label))
    output = _Output()
    try:
        res = rpull(args.address, args.namespace, args.image, source_options(args), opts, output)
    finally:
        output._close_bar()
    parts = [f"{res.count('lazy')} lazy", f"{res.count('unpacked')} unpacked", f"{res.count('exists')} existing"]
    n = len(res.layers)
    print(f"pulled {res.image} ({res.platform or 'single platform'}, manifest {_short(res.manifest_digest)}): "
          f"{n} layer{'' if n == 1 else 's'} ({', '.join(parts)}) in {res.seconds:.1f}s, "
          f"{_mb(res.downloaded)} downloaded")
    return 0
