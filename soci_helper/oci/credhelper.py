"""docker credential helpers: `docker-credential-<name> get` with the server on stdin, JSON on stdout."""

from __future__ import annotations

import json
import logging
import re
import shutil

import sh

from .auth import Credentials

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0
# The helper's name becomes part of an executable name: keep it to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# What helpers print on stdout when they have nothing for that server.
_NOT_FOUND = "credentials not found in native keychain"
# A username of this value means the secret is an identity (refresh) token.
_TOKEN_USER = "<token>"


class CredentialHelperError(Exception):
    """A credential helper exists but failed; the message never contains its output's secret."""


def run_helper(name: str, server: str, timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """Ask `docker-credential-<name>` for `server`'s credentials; None when it has none or is missing.

    The server URL goes to stdin, never argv, and the helper's output is
    parsed here and never logged (it holds the secret).
    """
    if not _NAME_RE.match(name):
        log.warning("credential helper name %r is not valid; ignoring it", name)
        return None
    exe = shutil.which(f"docker-credential-{name}")
    if exe is None:
        log.warning("credential helper docker-credential-%s not found on PATH; ignoring it", name)
        return None
    cmd = sh.Command(exe)
    try:
        out = cmd("get", _in=server, _timeout=timeout, _err_to_out=False, _tty_out=False)
    except sh.TimeoutException:
        raise CredentialHelperError(f"credential helper docker-credential-{name} timed out") from None
    except sh.ErrorReturnCode as e:
        stdout = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else str(e.stdout)
        if _NOT_FOUND in stdout.lower() or "not found" in stdout.lower():
            return None
        raise CredentialHelperError(
            f"credential helper docker-credential-{name} failed (exit {e.exit_code})"
        ) from None
    text = str(out)
    try:
        obj = json.loads(text)
    except ValueError:
        raise CredentialHelperError(
            f"credential helper docker-credential-{name} printed something that is not JSON"
        ) from None
    if not isinstance(obj, dict):
        raise CredentialHelperError(f"credential helper docker-credential-{name} printed a non-object")
    user = obj.get("Username")
    secret = obj.get("Secret")
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    if user == _TOKEN_USER:
        return Credentials(_TOKEN_USER, "", secret)
    log.debug("credential helper docker-credential-%s gave credentials for %s", name, server)
    return Credentials(user, secret)
