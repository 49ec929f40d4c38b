"""A loopback token issuer for distribution's `auth: token` mode, signing real ES256 JWTs.

The registry (distribution 2.8) trusts a token when its `x5c` header carries a
certificate chain ending in `rootcertbundle`; here the chain is one
self-signed certificate, which is also the whole bundle.

distribution accepts `exp` up to 60 s in the past (clock-skew leeway), so a
token meant to die after `lifetime` seconds is written with
`exp = now + lifetime - REGISTRY_LEEWAY`; the registry then really refuses it
`lifetime` seconds after issue. `advertised_lifetime` lets a test lie in
`expires_in` so that only a 401 can tell the client its token is dead.

Usage::

    with TokenIssuer(users={"alice": "pw"}, lifetime=2) as iss:
        with LocalRegistry(token_auth=iss.registry_settings("alice")) as reg:
            ...
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from soci_helper.sandbox.registry import TokenAuth

REGISTRY_LEEWAY = 60


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """Threaded HTTP token service on 127.0.0.1: basic-auth check, scoped access claims, ES256 JWTs."""

    def __init__(self, users: dict[str, str] | None = None, *, service: str = "soci-test-registry",
                 issuer: str = "soci-test-issuer", lifetime: int = 300,
                 advertised_lifetime: int | None = None, anonymous_pull: bool = False) -> None:
        self.users = dict(users or {})
        self.service = service
        self.issuer = issuer
        self.lifetime = lifetime
        self.advertised_lifetime = advertised_lifetime
        self.anonymous_pull = anonymous_pull
        self.requests: list[dict[str, Any]] = []  # one entry per token request: user, scopes, granted
        self.refresh_tokens: dict[str, str] = {}  # identity token -> user, for the refresh grant
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="soci-test-tokens-"))
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._make_cert()
        self.cert_path = self._dir / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "soci-test token signer")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    # --- lifecycle ----------------------------------------------------

    @property
    def realm(self) -> str:
        assert self._server is not None, "issuer not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_settings(self, user: str = "") -> TokenAuth:
        """What LocalRegistry(token_auth=...) needs; `user` (from `users`) is the pushing identity."""
        return TokenAuth(realm=self.realm, service=self.service, issuer=self.issuer,
                         rootcertbundle=str(self.cert_path), user=user,
                         password=self.users.get(user, ""))

    def start(self) -> TokenIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                issuer._answer(self, q.get("service", [""])[0], q.get("scope", []), self._basic())

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(n).decode())
                if form.get("grant_type", [""])[0] != "refresh_token":
                    issuer._send(self, 400, {"error": "unsupported_grant_type"})
                    return
                user = issuer.refresh_tokens.get(form.get("refresh_token", [""])[0])
                scopes = " ".join(form.get("scope", [])).split()
                issuer._answer(self, form.get("service", [""])[0], scopes, (user, True) if user else None)

            def _basic(self) -> tuple[str, bool] | None:
                h = self.headers.get("Authorization", "")
                if not h.startswith("Basic "):
                    return None
                try:
                    user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
                except ValueError:
                    return ("", False)
                return user, issuer.users.get(user) == pw

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- tokens -------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler, service: str, scopes: list[str],
                who: tuple[str, bool] | None) -> None:
        if who is not None and not who[1]:
            with self._lock:
                self.requests.append({"user": who[0], "scopes": scopes, "granted": None})
            self._send(h, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            return
        user = who[0] if who else ""
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, wanted = ":".join(parts[1:-1]), parts[-1].split(",")
            if user:
                allowed = [a for a in wanted if a in ("pull", "push", "delete", "*")]
            else:
                allowed = ["pull"] if self.anonymous_pull and "pull" in wanted else []
            if allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        with self._lock:
            self.requests.append({"user": user, "scopes": scopes, "granted": access})
        now = int(time.time())
        token = self.sign({
            "iss": self.issuer, "sub": user, "aud": service or self.service,
            "iat": now, "nbf": now - 5, "exp": now + self.lifetime - REGISTRY_LEEWAY,
            "jti": os.urandom(8).hex(), "access": access,
        })
        expires = self.advertised_lifetime if self.advertised_lifetime is not None else self.lifetime
        issued = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._send(h, 200, {"token": token, "access_token": token, "expires_in": expires,
                            "issued_at": issued})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def sign(self, claims: dict[str, Any]) -> str:
        """A compact JWS (ES256) over `claims`, with our certificate in the x5c header."""
        der = self._cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode("ascii")]}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        # JWS wants the raw r||s pair, 32 bytes each for P-256, not DER.
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def granted(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.requests)
