"""`soci-bench NAME [ARGS]`: runs one benchmark and prints its table (medians of interleaved runs, ratios)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from ..sandbox.signals import UnwindOnSignal
from . import e2e, fs_bench, registry_bench, suite, ztoc_bench

BENCHES: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "ztoc": (ztoc_bench.main, "soci create throughput and memory against gzip -dc; span extraction time"),
    "registry": (registry_bench.main, "registry client against curl: whole blob and 4 MiB ranges"),
    "fs": (fs_bench.main, "lazy mount and reads against the extracted layer: mount time, RSS, reads"),
    "e2e": (e2e.main, "pull + run to first output: lazy SOCI against containerd's full pull, loopback and shaped"),
    "suite": (suite.main, "lazy start against full pull on realistic workloads, loopback and a shaped network"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in BENCHES:
        print("usage: soci-bench NAME [ARGS] (NAME --help for its options)\n", file=sys.stderr)
        for name, (_, what) in BENCHES.items():
            print(f"  {name:10} {what}", file=sys.stderr)
        return 2
    fn, _ = BENCHES[args[0]]
    # Benchmarks own registries, containerd, mounts and namespaces: a SIGTERM must unwind through their cleanup.
    UnwindOnSignal("soci-bench").install()
    return fn(args[1:])


if __name__ == "__main__":
    sys.exit(main())
