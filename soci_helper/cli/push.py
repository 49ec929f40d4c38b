"""The `soci push` and `soci index pull` commands: argument parsing and output only.

The registry work is imported when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .common import add_platform_flags, add_registry_flags, source_options
from .progress import Progress

if TYPE_CHECKING:
    from ..index import ops

# index.push's EXISTING_INDEX_OPTIONS and EXISTING_WARN, spelled out so that building the parser does not import
# the registry client (a test keeps them equal).
EXISTING_INDEX_OPTIONS = ("warn", "skip", "allow")
EXISTING_WARN = "warn"


def add_push_parser(sub: Any) -> None:
    """Add `push IMAGE` to the top-level sub-parsers."""
    c = sub.add_parser("push", help="push local v1 SOCI indexes and their zTOCs to the image's registry")
    c.add_argument("image", metavar="IMAGE", help="registry reference of the image the indexes were built for")
    c.add_argument(
        "--existing-index", choices=EXISTING_INDEX_OPTIONS, default=EXISTING_WARN,
        help="when the registry already has a SOCI index for the image: warn (push anyway), skip, "
             "or allow (push without checking) (default: %(default)s)",
    )
    c.add_argument("-q", "--quiet", action="store_true", help="print only the digests of pushed indexes")
    add_platform_flags(c)
    add_registry_flags(c)
    c.set_defaults(func=cmd_push)


def add_index_pull_parser(index_sub: Any) -> None:
    """Add `pull IMAGE` to the `index` command's sub-parsers."""
    c = index_sub.add_parser("pull", help="find the image's SOCI index in its registry and fetch it with its zTOCs")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--soci-index-digest", metavar="DIGEST", help="fetch this index instead of discovering one")
    c.add_argument("-p", "--platform", help="platform of a multi-platform image (default: this host's)")
    c.add_argument("-q", "--quiet", action="store_true", help="print only the index digest")
    add_registry_flags(c)
    c.set_defaults(func=cmd_index_pull)


class _BlobOutput:
    """Upstream's per-artifact lines on stdout, plus a progress bar per upload when stderr is a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None

    def message(self, kind: str, text: str) -> None:
        if kind == "index":
            print(text if self.quiet else f"pushing soci index with digest: {text}", flush=True)
        elif kind == "warn" or not self.quiet:
            print(text, flush=True)

    def blob(self, desc: dict[str, Any], state: str) -> None:
        digest = desc["digest"]
        if state == "pushing":
            self.bar = Progress(f"push {digest[7:19]}", desc["size"])
            self.bar.update(0)
        elif self.bar is not None:
            self.bar.update(desc["size"])
            self.bar.close()
            self.bar = None
        if self.quiet:
            return
        line = {
            "pushing": "pushing artifact with digest: ",
            "pushed": "successfully pushed artifact with digest: ",
            "skipped": "skipped artifact with digest: ",
        }[state]
        print(line + digest, flush=True)


def cmd_push(args: argparse.Namespace, store: ops.Store) -> int:
    from ..index.push import push

    out = _BlobOutput(args.quiet)
    push(args.image, store, source_options(args), args.existing_index, out.message, out.blob)
    return 0


def cmd_index_pull(args: argparse.Namespace, store: ops.Store) -> int:
    from ..index.discover import discover

    opts = source_options(argparse.Namespace(**{**vars(args), "platform": []}))
    found = discover(args.image, opts, store, args.soci_index_digest, args.platform)
    if args.quiet:
        print(found.digest)
        return 0
    version = found.index.version
    print(f"pulled soci index {found.digest} ({version}, found via {found.found_via}) "
          f"for image manifest {found.image_digest}: {len(found.ztocs)} ztocs")
    return 0

