"""The `soci-snapshotter-grpc` daemon entry point (the snapshotter itself is not built yet)."""

from __future__ import annotations

import sys


def main() -> int:
    print("soci-snapshotter-grpc: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
