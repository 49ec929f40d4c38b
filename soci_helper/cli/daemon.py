"""The `soci-snapshotter-grpc` daemon: flags, config, logging, signals, socket activation, readiness, metrics."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .. import config as configmod
from .common import configure_logging, default_root, run_main

if TYPE_CHECKING:
    # Imported for real only when serving: `config default` must not pay for gRPC.
    from ..snapshotter.metrics import MetricsServer
    from ..snapshotter.service import Server, Snapshotter
    from ..snapshotter.systemd import SocketRelay

PROG = "soci-snapshotter-grpc"
DEFAULT_ADDRESS = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
FD_SCHEME = "fd://"

log = logging.getLogger(PROG)

# syslog priorities, which journald reads from a "<N>" line prefix on a service's stderr.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="containerd proxy snapshotter that mounts SOCI-indexed "
                                                       "layers lazily")
    p.add_argument("--address", default=DEFAULT_ADDRESS,
                   help="unix socket to serve on, or fd:// for the socket systemd passes (default: %(default)s)")
    p.add_argument("--root", default=None, help="state directory (default: /var/lib/soci-snapshotter-grpc, "
                                                "or a per-user directory when not root)")
    p.add_argument("--config", default=configmod.DEFAULT_CONFIG_PATH, help="config.toml (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "warning", "error"],
                   help="(default: %(default)s)")
    p.add_argument("--metrics-address", default=None, metavar="HOST:PORT|PATH",
                   help="serve Prometheus metrics at /metrics here (default: metrics_address from the config; "
                        "empty: off)")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("config", help="print the configuration as TOML")
    c.add_argument("what", choices=["default", "dump"],
                   help="default: built-in defaults; dump: the effective configuration (--config applied)")
    return p


class _OneLineFormatter(logging.Formatter):
    """Every record on exactly one line (tracebacks included), so each event is one line in any log."""

    def __init__(self, journal: bool) -> None:
        # journald stamps lines itself and takes the level from the prefix.
        fmt = "%(levelname)s %(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "").replace("\n", " | ")
        if self.journal:
            text = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to the device:inode of the stream it connected to stderr.
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return bool(want) and want == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str) -> None:
    configure_logging(level)
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    fmt = _OneLineFormatter(_stderr_is_journal())
    for h in root.handlers:
        h.setFormatter(fmt)


def _snapshot_counts(sn: Snapshotter) -> dict[str, int]:
    from ..snapshotter.metadata import Kind

    counts = Counter(Kind(s.kind).name.lower() for s in sn.store.all())
    return {k.name.lower(): counts.get(k.name.lower(), 0) for k in Kind}


def _serve(args: argparse.Namespace) -> int:
    from ..snapshotter import systemd
    from ..snapshotter.metrics import MetricsServer
    from ..snapshotter.service import Server, build_snapshotter

    # Taken out of the environment first, so that nothing the daemon starts inherits them.
    notifier = systemd.Notifier()
    fds = systemd.listen_fds()

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            log.info("received %s, stopping", signal.Signals(signum).name)
            stopping.set()

    # Installed before the (possibly slow) restore, so that a stop request then is not lost.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    cfg = configmod.load(args.config, required=args.config != configmod.DEFAULT_CONFIG_PATH)
    metrics_address = cfg.metrics_address if args.metrics_address is None else args.metrics_address
    root = args.root or default_root()

    listener = None
    public = args.address
    serve_at = args.address
    if args.address.startswith(FD_SCHEME):
        wanted = args.address[len(FD_SCHEME):]
        if wanted and not wanted.isdigit():
            raise configmod.ConfigError(f"--address {args.address}: expected fd:// or fd://N")
        try:
            listener = systemd.unix_listener(fds, int(wanted) if wanted else None)
        except systemd.ActivationError as exc:
            raise configmod.ConfigError(str(exc)) from None
        public = systemd.socket_path(listener)
        serve_at = systemd.backend_path(public)
        log.info("socket activation: %s (fd %d)", public, listener.fileno())
    elif fds:
        log.warning("ignoring %d socket(s) passed by the service manager: --address is not fd://", len(fds))

    notifier.status("restoring snapshots and mounts")
    sn = build_snapshotter(root, cfg)
    server = Server(serve_at, sn)
    try:
        server.start()
    except BaseException:
        # Not server.stop(): that would unlink a socket another daemon may be serving on.
        sn.close()
        if listener is not None:
            listener.close()
        raise
    relay: systemd.SocketRelay | None = None
    metrics: MetricsServer | None = None
    try:
        if listener is not None:
            relay = systemd.SocketRelay(listener, serve_at)
            relay.start()
        if metrics_address:
            metrics = MetricsServer(metrics_address, root, snapshots=lambda: _snapshot_counts(sn))
            metrics.start()
    except BaseException:
        _shutdown(server, relay, metrics)
        if listener is not None and relay is None:
            listener.close()
        raise

    if not stopping.is_set():
        # Only now: the snapshot store is restored and the socket answers, so containerd may start.
        notifier.ready(f"serving on {public}")
        log.info("ready: serving on %s (root %s)", public, root)
    # Waiting on the event (not the server) keeps the main thread responsive to signals.
    while not stopping.wait(1.0):
        pass
    notifier.stopping()
    _shutdown(server, relay, metrics)
    if listener is not None:
        _remove_private_dir(serve_at)
    log.info("exited cleanly")
    return 0


def _shutdown(server: Server, relay: SocketRelay | None, metrics: MetricsServer | None) -> None:
    """Stop in the order that loses nothing: no new connections, then finish calls, then drop connections."""
    if relay is not None:
        relay.stop_accepting()
    if metrics is not None:
        metrics.stop()
    server.stop()
    if relay is not None:
        relay.close()


def _remove_private_dir(sock: str) -> None:
    # backend_path's fallback made a private directory for the socket; the server has removed the socket.
    d = Path(sock).parent
    if d.name.startswith(f"{PROG}.") and sock.endswith("/grpc.sock"):
        try:
            d.rmdir()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = "warning" if args.log_level == "warn" else args.log_level
    setup_logging(level)

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
