"""The `mount.fuse.soci` mount helper entry point (the lazy filesystem is not built yet)."""

from __future__ import annotations

import sys


def main() -> int:
    print("mount.fuse.soci: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
