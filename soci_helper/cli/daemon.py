"""The `soci-snapshotter-grpc` daemon: flags, config, signals; the service lives in soci_helper.snapshotter."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from .. import config as configmod
from .common import configure_logging, default_root, run_main

PROG = "soci-snapshotter-grpc"
DEFAULT_ADDRESS = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

log = logging.getLogger(PROG)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="containerd proxy snapshotter that mounts SOCI-indexed "
                                                       "layers lazily")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="unix socket to serve on (default: %(default)s)")
    p.add_argument("--root", default=None, help="state directory (default: /var/lib/soci-snapshotter-grpc, "
                                                "or a per-user directory when not root)")
    p.add_argument("--config", default=configmod.DEFAULT_CONFIG_PATH, help="config.toml (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "warning", "error"],
                   help="(default: %(default)s)")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("config", help="print the configuration as TOML")
    c.add_argument("what", choices=["default", "dump"],
                   help="default: built-in defaults; dump: the effective configuration (--config applied)")
    return p


def _serve(args: argparse.Namespace) -> int:
    from ..snapshotter.service import Server, Snapshotter

    cfg = configmod.load(args.config, required=args.config != configmod.DEFAULT_CONFIG_PATH)
    root = args.root or default_root()
    sn = Snapshotter(root, cfg)
    try:
        server = Server(args.address, sn)
        server.start()
    except BaseException:
        sn.close()
        raise
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            log.info("received %s, stopping", signal.Signals(signum).name)
            stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Waiting on the event (not the server) keeps the main thread responsive to signals.
    while not stopping.wait(1.0):
        pass
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = "warning" if args.log_level == "warn" else args.log_level
    configure_logging(level)

    def body() -> int:
        if args.command == "config":
            if args.what == "default":
                cfg = configmod.Config()
            else:
                cfg = configmod.load(args.config, required=args.config != configmod.DEFAULT_CONFIG_PATH)
            sys.stdout.write(configmod.to_toml(cfg))
            return 0
        return _serve(args)

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
