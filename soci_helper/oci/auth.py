"""Registry credentials: explicit `user:pass`, docker config.json `auths`, and the credential-helper hook."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReferenceError_
from .reference import DOCKER_HUB, normalize_registry_host

log = logging.getLogger(__name__)

# The key docker login writes for Docker Hub.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credentials:
    """A username and secret; the secret never appears in repr() or str()."""

    username: str
    password: str = field(repr=False)
    # An OAuth2 refresh token from `docker login` (docker config `identitytoken`).
    identity_token: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"credentials for {self.username!r}"


# A credential helper runner: given the helper name (the `X` of
# docker-credential-X) and the server key, return credentials or None.
HelperRunner = Callable[[str, str], "Credentials | None"]

_helper_runner: HelperRunner | None = None


def set_helper_runner(runner: HelperRunner | None) -> None:
    """Install the function that runs docker credential helpers (credHelpers / credsStore).

    Until one is installed, `docker-credential-<name> get` is run from PATH
    (see credhelper); a helper that is missing or fails is skipped and the
    plain `auths` entries are used.
    """
    global _helper_runner
    _helper_runner = runner


def _run_helper(name: str, server: str) -> Credentials | None:
    """The installed runner, else the built-in shell-out; a failing helper falls back to `auths`."""
    if _helper_runner is not None:
        return _helper_runner(name, server)
    from .credhelper import CredentialHelperError, run_helper

    try:
        return run_helper(name, server)
    except CredentialHelperError as e:
        log.warning("%s; using the config's auths entry if there is one", e)
        return None


def parse_user(text: str) -> Credentials:
    """Parse an explicit `user:password` (the password may itself contain ':')."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        # Do not echo the text: it may be a password typed in the wrong place.
        raise ReferenceError_("invalid --user value: want USER:PASSWORD")
    return Credentials(user, password)


def docker_config_path() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`."""
    base = os.environ.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    return Path.home() / ".docker" / "config.json"


def load_docker_config(path: Path | None = None) -> dict[str, Any]:
    """Read a docker config file; a missing file is an empty config, a corrupt one is an error."""
    p = path or docker_config_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ReferenceError_(f"cannot read docker config {p}: {e.strerror}") from None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ReferenceError_(f"cannot parse docker config {p}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ReferenceError_(f"cannot parse docker config {p}: not a JSON object")
    return obj


def config_key_host(key: str) -> str:
    """The registry host a config.json key names (`https://index.docker.io/v1/` -> `docker.io`)."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.split("/", 1)[0]
    return normalize_registry_host(k)


def _decode_entry(entry: Any) -> Credentials | None:
    if not isinstance(entry, Mapping):
        return None
    identity = entry.get("identitytoken") or None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ReferenceError_("invalid docker config: an 'auth' entry is not valid base64") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ReferenceError_("invalid docker config: an 'auth' entry is not user:password")
        return Credentials(user, password, identity)
    user = entry.get("username")
    password = entry.get("password")
    if isinstance(user, str) and user and isinstance(password, str):
        return Credentials(user, password, identity)
    if isinstance(identity, str):
        return Credentials("<token>", "", identity)
    return None


def _helper_for(config: Mapping[str, Any], host: str) -> tuple[str, str] | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, Mapping):
        for key, name in helpers.items():
            if isinstance(name, str) and name and config_key_host(key) == host:
                return name, key
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return store, DOCKER_HUB_CONFIG_KEY if host == DOCKER_HUB else host
    return None


def lookup_credentials(host: str, config: Mapping[str, Any] | None = None) -> Credentials | None:
    """Credentials for registry `host` from a docker config (read from disk when not given)."""
    cfg = load_docker_config() if config is None else config
    want = normalize_registry_host(host)
    helper = _helper_for(cfg, want)
    if helper is not None:
        creds = _run_helper(*helper)
        if creds is not None:
            return creds
    auths = cfg.get("auths")
    if not isinstance(auths, Mapping):
        return None
    # An exact key wins over one that only normalises to the same host.
    if host in auths:
        creds = _decode_entry(auths[host])
        if creds is not None:
            return creds
    for key, entry in auths.items():
        if isinstance(key, str) and config_key_host(key) == want:
            creds = _decode_entry(entry)
            if creds is not None:
                return creds
    return None


def resolve_credentials(host: str, user: str | None = None,
                        config_path: Path | None = None) -> Credentials | None:
    """Explicit `user:pass` first, then the docker config for `host`."""
    if user:
        return parse_user(user)
    return lookup_credentials(host, load_docker_config(config_path))
