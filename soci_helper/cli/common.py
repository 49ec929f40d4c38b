"""What every front end shares: default paths, logging set-up, and turning failures into one line.

Imports here stay light: every entry point (`soci --help`, the daemon, mount.fuse.soci) loads this module, so
what only some commands need (the registry client and `requests`, the config parser) is imported when used.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import SociError

if TYPE_CHECKING:
    from ..config import Config
    from ..oci.source import SourceOptions

SYSTEM_ROOT = "/var/lib/soci-snapshotter-grpc"


def default_root() -> str:
    if os.geteuid() == 0:
        return SYSTEM_ROOT
    import platformdirs

    return platformdirs.user_data_dir("soci-snapshotter-grpc")


def configure_logging(level: str) -> None:
    """One line per event on stderr, with level and logger, for operators."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; every failure becomes `prog: error: ...` on stderr and a non-zero exit."""
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    try:
        return body()
    except SociError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 1
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {what}{where}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort so users never see a traceback
        if debug:
            logging.getLogger(prog).exception("internal error")
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 70


def add_registry_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    g.add_argument("-k", "--skip-verify", action="store_true", help="do not verify the registry's certificate")
    g.add_argument("-u", "--user", metavar="USER[:PASSWORD]", help="registry credentials")
    g.add_argument("--tlscacert", metavar="FILE", help="CA certificate to verify the registry with")


def add_platform_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--platform", action="append", default=[], help="platform(s) to index (os/arch[/variant])")
    p.add_argument("--all-platforms", action="store_true", help="index every platform of a multi-platform image")


def source_options(args: argparse.Namespace) -> SourceOptions:
    from ..oci.source import SourceOptions

    user = args.user
    if user and ":" not in user:
        # Asking on the terminal keeps the password out of argv and shell history.
        import getpass

        user = f"{user}:{getpass.getpass(f'password for {user}: ')}"
    return SourceOptions(
        plain_http=args.plain_http,
        skip_verify=args.skip_verify,
        ca_file=args.tlscacert,
        user=user,
        platform=_platforms(getattr(args, "platform", None)),
        all_platforms=getattr(args, "all_platforms", False),
        config=load_config(getattr(args, "config", None)),
    )


def _platforms(value: str | list[str] | None) -> str | None:
    if not value:
        return None
    return value if isinstance(value, str) else ",".join(value)


def load_config(path: str | None = None) -> Config:
    """config.toml: the named file (which must exist), else the system one if present, else defaults."""
    from ..config import DEFAULT_CONFIG_PATH
    from ..config import load as _load_config

    return _load_config(path or DEFAULT_CONFIG_PATH, required=bool(path))
