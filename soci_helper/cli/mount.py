"""The `mount.fuse.soci` entry point that mount(8) runs for `mount -t fuse.soci SRC DIR -o OPTS`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .common import configure_logging, run_main

PROG = "mount.fuse.soci"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Only the final error line belongs on mount's stderr; details go to the layer server's log.
    configure_logging("info" if "-v" in args else "critical")

    def run() -> int:
        from ..mount.helper import mount, parse_argv

        req = parse_argv(args)
        # This process has no threads: the table builder can be forked from it, before the server starts.
        result = mount(req, prebuild=True)
        if req.verbose and result is not None:
            print(f"{PROG}: mounted {req.source} at {req.mountpoint} (server pid {result.pid}, id {result.mount_id})")
        return 0

    return run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
