"""`soci-bench`: runs one benchmark and prints its table (medians of interleaved runs, ratios to a baseline)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import ztoc_bench


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soci-bench", description=__doc__)
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    ztoc_bench.add_parser(sub)
    args = p.parse_args(argv)
    print(args.func(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
