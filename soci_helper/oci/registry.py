"""OCI distribution client: auth, retries, mirrors, manifests, blobs, byte ranges, uploads, tags, referrers."""

from __future__ import annotations

import base64
import bisect
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import requests.adapters
import requests.auth
import urllib3

from .. import digest as _digest
from ..config import Config
from ..errors import DigestError, NotFound, RegistryError
from . import mediatype as mt
from .auth import Credentials
from .manifest import Descriptor, detect_media_type
from .mirrors import Mirror, mirrors_for
from .reference import DOCKER_HUB, DOCKER_HUB_API
from .retry import RETRY_STATUSES, RetryPolicy, parse_retry_after

log = logging.getLogger(__name__)

# Big reads: per-call Python overhead then vanishes next to the copy itself.
CHUNK = 4 << 20
DEFAULT_TIMEOUT = (10.0, 120.0)  # (connect, read) seconds
# Manifests are small; a registry sending more is broken or hostile.
MAX_MANIFEST_BYTES = 4 << 20
# An error body up to this size is read, so that its connection stays in the pool.
MAX_ERROR_BODY = 64 << 10
# Blobs at least this big are uploaded in PATCH chunks of UPLOAD_CHUNK bytes.
CHUNKED_UPLOAD_THRESHOLD = 256 << 20
UPLOAD_CHUNK = 32 << 20
# How often a whole blob is fetched again when its bytes arrive corrupted.
DIGEST_RETRIES = 2
_USER_AGENT = "soci-helper/0.1"
_POOL_SIZE = 32


@dataclass(frozen=True)
class RegistryOptions:
    """How to talk to one registry host. Hashable: clients are shared per (host, options)."""

    plain_http: bool = False
    skip_verify: bool = False
    ca_file: str | None = None
    credentials: Credentials | None = None
    timeout: tuple[float, float] = DEFAULT_TIMEOUT  # (connect, read between bytes)
    # Deadline of one request with its body, for everything but whole-blob streams
    # (a multi-GB layer legitimately takes longer); None means no deadline.
    request_timeout: float | None = None
    retry: RetryPolicy = RetryPolicy()
    mirrors: tuple[Mirror, ...] = ()
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    chunked_upload_threshold: int = CHUNKED_UPLOAD_THRESHOLD
    upload_chunk_size: int = UPLOAD_CHUNK

    @classmethod
    def from_config(cls, cfg: Config, host: str, *, plain_http: bool = False, skip_verify: bool = False,
                    ca_file: str | None = None, credentials: Credentials | None = None,
                    ) -> RegistryOptions:
        """Options from config.toml's [http] (retries, timeouts) and `host`'s mirrors."""
        h = cfg.http
        return cls(
            plain_http=plain_http, skip_verify=skip_verify, ca_file=ca_file, credentials=credentials,
            timeout=(h.DialTimeoutMsec / 1000.0, h.ResponseHeaderTimeoutMsec / 1000.0),
            request_timeout=(h.RequestTimeoutMsec / 1000.0) or None,
            retry=RetryPolicy(max(0, h.MaxRetries), h.MinWaitMsec / 1000.0, h.MaxWaitMsec / 1000.0),
            mirrors=mirrors_for(cfg, host),
        )


_TRANSFER_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError,
                    TimeoutError)


class _Restart(RegistryError):
    """An upload session that cannot go on (lost offset, gone): the whole upload starts over; internal."""

    retry_after: float | None = None


class _Transient(RegistryError):
    """A failure worth retrying (connection, timeout, truncation, 5xx, 429); internal."""

    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after
        self.progress = 0  # bytes of a range already in the buffer when this happened


class _Session(requests.Session):
    """A Session whose redirects never gain credentials.

    requests drops Authorization when a redirect changes host, but then adds
    ~/.netrc credentials for the new host; a blob-storage redirect must carry
    only what its signed URL says.
    """

    def __init__(self) -> None:
        super().__init__()
        self._env: dict[str, tuple[dict[str, str], str | None]] = {}

    def merge_environment_settings(self, url: str | bytes | None, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        """requests' own, with the environment read once per scheme and host instead of on every request.

        Proxy variables, no_proxy and the CA bundle variables keep their meaning; scanning them cost about
        half a millisecond of each span fetch."""
        if not self.trust_env or not isinstance(url, str):
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        key = "/".join(url.split("/", 3)[:3])
        env = self._env.get(key)
        if env is None:
            ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            env = self._env[key] = (requests.utils.get_environ_proxies(url), ca)
        merged = dict(proxies or {})
        for k, v in env[0].items():
            merged.setdefault(k, v)
        if verify is True or verify is None:
            verify = env[1] or verify
        ms = requests.sessions.merge_setting
        return {"proxies": ms(merged, self.proxies), "stream": ms(stream, self.stream),
                "verify": ms(verify, self.verify), "cert": ms(cert, self.cert)}

    def rebuild_auth(self, prepared_request: requests.PreparedRequest,
                     response: requests.Response) -> None:
        if "Authorization" in prepared_request.headers and self.should_strip_auth(
                response.request.url, prepared_request.url):
            del prepared_request.headers["Authorization"]


class _HeaderAuth(requests.auth.AuthBase):
    """Sets (or deliberately leaves out) Authorization on the first hop only.

    Passing an auth object on every request also stops requests from falling
    back to ~/.netrc, which would overwrite the header we chose.
    """

    def __init__(self, value: str | None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<_HeaderAuth>"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.value:
            r.headers["Authorization"] = self.value
        else:
            r.headers.pop("Authorization", None)
        return r


_CHALLENGE_RE = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
# An upload session's status: `Range: 0-LAST` (the spec's form; some registries prefix `bytes=`).
_UPLOAD_RANGE_RE = re.compile(r"(?:bytes=)?0-(\d+)")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse one WWW-Authenticate challenge into (scheme lower-cased, params)."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for m in _CHALLENGE_RE.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted and merged where they overlap or touch; empty ones dropped."""
    out: list[list[int]] = []
    for off, length in sorted((o, n) for o, n in ranges if n > 0):
        if out and off <= out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length)
        else:
            out.append([off, off + length])
    return [(a, b - a) for a, b in out]


_hash_executor: concurrent.futures.ThreadPoolExecutor | None = None
_hash_lock = threading.Lock()


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _hash_executor
    with _hash_lock:
        if _hash_executor is None:
            _hash_executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="blob-sha256")
        return _hash_executor


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic() after which we fetch a new one


def _token_lifetime(body: dict[str, Any]) -> float:
    """Seconds a token response stays usable, from expires_in and issued_at (default 60 s)."""
    expires_in = body.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 60.0
    issued = body.get("issued_at")
    if isinstance(issued, str) and issued:
        try:
            from datetime import datetime

            t = datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp()
            # A token issued a while ago (clock skew, slow network) has less life left.
            lifetime = min(lifetime, max(0.0, t + lifetime - time.time()))
        except ValueError:
            pass
    # Renew early so a token does not expire between our check and the registry's.
    return lifetime - 10.0 if lifetime > 20.0 else lifetime / 2


class RegistryClient:
    """One registry host: a reused session, its auth state, its mirrors and the API calls we need."""

    def __init__(self, host: str, opts: RegistryOptions | None = None) -> None:
        self.host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.display = host
        self.opts = opts or RegistryOptions()
        scheme = "http" if self.opts.plain_http else "https"
        self.base_url = f"{scheme}://{self.host}"
        self.session = _Session()
        # Retries are ours (with back-off and resume); urllib3's would hide failures from us.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=_POOL_SIZE, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = _USER_AGENT
        for k, v in self.opts.headers:
            self.session.headers[k] = v
        self._lock = threading.Lock()
        self._scheme: str | None = None  # "basic" or "bearer" once a challenge was seen
        self._challenge: dict[str, str] = {}
        self._tokens: dict[str, _Token] = {}
        if self.opts.skip_verify:
            # The user chose this; urllib3 would otherwise warn on every request.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
            self._verify: bool | str = False
        elif self.opts.ca_file:
            if not os.path.isfile(self.opts.ca_file):
                raise RegistryError(f"registry {self.display}: CA file {self.opts.ca_file} does not exist")
            self._verify = self.opts.ca_file
        else:
            self._verify = True
        # Mirrors get no credentials: the registry's secret is not the mirror's business.
        self.mirrors = [
            RegistryClient(m.host, replace(self.opts, plain_http=m.plain_http, credentials=None, mirrors=(),
                                           headers=m.headers,
                                           request_timeout=m.request_timeout or self.opts.request_timeout))
            for m in self.opts.mirrors
        ]

    def __repr__(self) -> str:
        return f"<RegistryClient {self.base_url}>"

    def close(self) -> None:
        for m in self.mirrors:
            m.close()
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- auth ---------------------------------------------------------

    def _basic_value(self) -> str | None:
        c = self.opts.credentials
        if c is None or (not c.password and c.identity_token):
            return None
        raw = f"{c.username}:{c.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _auth_value(self, scope: str) -> str | None:
        with self._lock:
            scheme = self._scheme
            tok = self._tokens.get(scope)
        if scheme == "basic":
            return self._basic_value()
        if scheme == "bearer":
            if tok is None or tok.expires <= time.monotonic():
                tok = self._fetch_token(scope)
            return "Bearer " + tok.value
        return None

    def _fetch_token(self, scope: str, extra_scope: str | None = None) -> _Token:
        with self._lock:
            challenge = dict(self._challenge)
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.display}: Bearer challenge without a realm")
        scopes = [s for s in scope.split(" ") if s]
        scopes += [s for s in (extra_scope or "").split(" ") if s and s not in scopes]
        where = f"token service {urlsplit(realm).netloc}"
        creds = self.opts.credentials
        service = challenge.get("service", "")
        if creds is not None and creds.identity_token:
            # OAuth2 refresh-token grant (what `docker login` leaves as identitytoken).
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "soci-helper", "service": service, "scope": " ".join(scopes)}
            method, url, body, auth = "POST", realm, form, _HeaderAuth(None)
        else:
            params = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
            url = realm + (("&" if "?" in realm else "?") + urlencode(params) if params else "")
            method, body, auth = "GET", None, _HeaderAuth(self._basic_value())
        r = None
        for attempt in range(self.opts.retry.max_retries + 1):
            try:
                r = self.session.request(method, url, data=body, auth=auth, timeout=self.opts.timeout,
                                         verify=self._verify)
            except requests.RequestException as e:
                err = self._conn_error(e, where)
                if attempt >= self.opts.retry.max_retries or not isinstance(err, _Transient):
                    raise RegistryError(str(err)) from None
                self._sleep(attempt, None, str(err))
                continue
            if r.status_code in RETRY_STATUSES and attempt < self.opts.retry.max_retries:
                r.close()
                self._sleep(attempt, parse_retry_after(r.headers.get("Retry-After")),
                            f"{where} answered HTTP {r.status_code}")
                continue
            break
        assert r is not None
        if r.status_code in (401, 403):
            who = "the given credentials were refused" if creds else "anonymous access was refused"
            raise RegistryError(
                f"registry {self.display}: authentication failed at {where} "
                f"for {' '.join(scopes) or 'the registry'} ({who}, HTTP {r.status_code})"
            )
        if r.status_code != 200:
            raise RegistryError(f"registry {self.display}: {where} answered HTTP {r.status_code}")
        try:
            data = r.json()
        except ValueError:
            raise RegistryError(f"registry {self.display}: {where} returned invalid JSON") from None
        value = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"registry {self.display}: {where} returned no token")
        tok = _Token(value, time.monotonic() + _token_lifetime(data))
        log.debug("registry %s: new token for %s", self.display, scope or "the registry")
        with self._lock:
            self._tokens[scope] = tok
        return tok

    def _handle_challenge(self, r: requests.Response, scope: str) -> None:
        header = r.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(header) if header else ("", {})
        if scheme == "basic":
            if self.opts.credentials is None:
                raise RegistryError(
                    f"registry {self.display}: authentication required (HTTP 401); no credentials given"
                )
            with self._lock:
                self._scheme = "basic"
            return
        if scheme == "bearer":
            with self._lock:
                self._scheme = "bearer"
                self._challenge = params
                self._tokens.pop(scope, None)
            self._fetch_token(scope, params.get("scope"))
            return
        raise RegistryError(
            f"registry {self.display}: HTTP 401 with an unsupported authentication challenge {scheme!r}"
        )

    # --- transport ----------------------------------------------------

    def _conn_error(self, e: BaseException, what: str) -> RegistryError:
        """A one-line error for a transport failure; _Transient when retrying may help."""
        if isinstance(e, requests.exceptions.SSLError):
            return RegistryError(
                f"registry {self.display}: TLS handshake with {what} failed "
                f"(certificate not trusted? use --tlscacert FILE or --skip-verify)"
            )
        if isinstance(e, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return _Transient(f"registry {self.display}: {what}: timed out")
        if isinstance(e, (urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError,
                          ConnectionResetError, urllib3.exceptions.IncompleteRead)):
            return _Transient(f"registry {self.display}: {what}: connection broke mid-transfer")
        if isinstance(e, (requests.exceptions.ConnectionError, ConnectionError)):
            return _Transient(f"registry {self.display}: {what}: cannot connect")
        return _Transient(f"registry {self.display}: {what}: request failed: {type(e).__name__}")

    def _sleep(self, attempt: int, retry_after: float | None, reason: str) -> None:
        pause = self.opts.retry.delay(attempt, retry_after)
        log.warning("%s; retry %d/%d in %.2fs", reason, attempt + 1, self.opts.retry.max_retries, pause)
        time.sleep(pause)

    def _gave_up(self, err: RegistryError, attempts: int) -> RegistryError:
        if attempts <= 1:
            return err  # a _Transient stays one, so an outer loop (a whole upload) may start over
        return RegistryError(f"{err} (gave up after {attempts} attempts)")

    def _request(self, method: str, url: str, *, scope: str, what: str, stream: bool = False,
                 headers: dict[str, str] | None = None, data: Any = None,
                 rewind: IO[bytes] | None = None, allow_redirects: bool = True,
                 retry: bool = True) -> requests.Response:
        """Send one request with retries; answer at most one auth challenge per call.

        Connection failures, timeouts, 5xx and 429 are retried with back-off
        (Retry-After honoured) when `retry`; 401 once after a new token; other
        4xx are returned to the caller at once.
        """
        if not url.startswith(("http://", "https://")):
            url = self.base_url + url
        policy = self.opts.retry
        attempt = 0
        challenged = False
        while True:
            if rewind is not None:
                rewind.seek(0)
            try:
                r = self.session.request(
                    method, url, headers=headers, data=data, stream=stream,
                    auth=_HeaderAuth(self._auth_value(scope)), timeout=self.opts.timeout,
                    verify=self._verify, allow_redirects=allow_redirects,
                )
            except requests.RequestException as e:
                err = self._conn_error(e, what)
                if not isinstance(err, _Transient) or not retry or attempt >= policy.max_retries:
                    raise self._gave_up(err, attempt + 1) from None
                self._sleep(attempt, None, str(err))
                attempt += 1
                continue
            if r.status_code == 401 and not challenged:
                r.close()
                challenged = True
                self._handle_challenge(r, scope)
                continue
            if r.status_code in (401, 403):
                r.close()
                creds = ("the given credentials were refused" if self.opts.credentials
                         else "no credentials given")
                raise RegistryError(
                    f"registry {self.display}: {what}: authentication failed ({creds}, HTTP {r.status_code})"
                )
            if r.status_code in RETRY_STATUSES and retry and attempt < policy.max_retries:
                r.close()
                self._sleep(attempt, parse_retry_after(r.headers.get("Retry-After")),
                            f"registry {self.display}: {what}: HTTP {r.status_code}")
                attempt += 1
                continue
            if r.status_code in RETRY_STATUSES and attempt:
                r.close()
                raise self._gave_up(
                    RegistryError(f"registry {self.display}: {what}: HTTP {r.status_code}"), attempt + 1)
            return r

    def _error(self, r: requests.Response, what: str) -> RegistryError:
        detail = ""
        try:
            body = r.json()
            if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
                e0 = body["errors"][0]
                if isinstance(e0, dict):
                    code = str(e0.get("code", ""))
                    msg = str(e0.get("message", ""))
                    detail = ": " + " ".join(x for x in (code, msg) if x)[:200]
        except Exception:
            detail = ""
        r.close()
        if r.status_code == 404:
            return NotFound(f"registry {self.display}: {what}: not found (HTTP 404){detail}")
        if r.status_code in RETRY_STATUSES:
            return _Transient(f"registry {self.display}: {what}: HTTP {r.status_code}{detail}",
                              parse_retry_after(r.headers.get("Retry-After")))
        return RegistryError(f"registry {self.display}: {what}: HTTP {r.status_code}{detail}")

    @staticmethod
    def _scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def _read_small(self, r: requests.Response, what: str) -> bytes:
        buf = bytearray()
        try:
            for chunk in r.iter_content(1 << 16):
                buf += chunk
                if len(buf) > MAX_MANIFEST_BYTES:
                    raise RegistryError(
                        f"registry {self.display}: {what}: larger than {MAX_MANIFEST_BYTES} bytes"
                    )
        except _TRANSFER_ERRORS as e:
            raise self._conn_error(e, what) from None
        finally:
            r.close()
        return bytes(buf)

    def _mirrored(self, name: str, *args: Any, **kw: Any) -> Any:
        """Call method `name` on each mirror in turn, then on the registry itself."""
        for m in self.mirrors:
            try:
                return getattr(m, name)(*args, **kw)
            except (RegistryError, NotFound, DigestError) as e:
                log.info("mirror %s failed, trying the next source: %s", m.display, e)
        return getattr(self, "_" + name)(*args, **kw)

    def _retrying(self, fn: Any, what: str) -> Any:
        """Run `fn` again after transient failures that happen past the request (in the body)."""
        attempt = 0
        while True:
            try:
                return fn()
            except (_Transient, _Restart) as e:
                if attempt >= self.opts.retry.max_retries:
                    raise self._gave_up(e, attempt + 1) from None
                self._sleep(attempt, e.retry_after, str(e))
                attempt += 1

    # --- API: reads ---------------------------------------------------

    def ping(self) -> None:
        """Check that the host speaks the distribution API and that we may use it."""
        r = self._request("GET", "/v2/", scope="", what="API check")
        if r.status_code != 200:
            raise self._error(r, "API check /v2/")
        r.close()

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, Descriptor]:
        """GET a manifest by tag or digest; return its bytes and a descriptor of exactly those bytes.

        When `ref` is a digest the bytes must hash to it (DigestError otherwise).
        Mirrors are tried first.
        """
        return self._mirrored("get_manifest", repo, ref)  # type: ignore[no-any-return]

    def _get_manifest(self, repo: str, ref: str) -> tuple[bytes, Descriptor]:
        what = f"manifest {repo}:{ref}" if not ref.startswith("sha256:") else f"manifest {repo}@{ref}"

        def once() -> tuple[bytes, str | None]:
            r = self._request("GET", f"/v2/{repo}/manifests/{ref}", scope=self._scope(repo), what=what,
                              headers={"Accept": mt.MANIFEST_ACCEPT}, stream=True)
            if r.status_code != 200:
                raise self._error(r, what)
            return self._read_small(r, what), r.headers.get("Content-Type")

        data, ctype = self._retrying(once, what)
        got = _digest.of_bytes(data)
        if ref.startswith("sha256:") and got != ref:
            raise DigestError(f"registry {self.display}: {what}: digest mismatch: got {got}")
        media_type = detect_media_type(data, ctype)
        return data, Descriptor(media_type=media_type, digest=got, size=len(data))

    def head_manifest(self, repo: str, ref: str) -> Descriptor | None:
        """HEAD a manifest; None when it does not exist. The digest comes from the registry's header."""
        what = f"manifest {repo}:{ref}"
        r = self._request("HEAD", f"/v2/{repo}/manifests/{ref}", scope=self._scope(repo), what=what,
                          headers={"Accept": mt.MANIFEST_ACCEPT})
        r.close()
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._error(r, what)
        d = r.headers.get("Docker-Content-Digest") or (ref if ref.startswith("sha256:") else None)
        size = r.headers.get("Content-Length")
        if not d or size is None:
            return None
        return Descriptor(media_type=mt.base_type(r.headers.get("Content-Type", "")) or mt.OCI_MANIFEST,
                          digest=_digest.validate(d), size=int(size))

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The size of a blob, or None when the repository does not have it."""
        what = f"blob {repo}@{digest}"
        r = self._request("HEAD", f"/v2/{repo}/blobs/{_digest.validate(digest)}",
                          scope=self._scope(repo), what=what)
        r.close()
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._error(r, what)
        size = r.headers.get("Content-Length")
        return int(size) if size is not None and size.isdigit() else 0

    def open_blob(self, repo: str, digest: str, size: int | None = None) -> Iterator[bytes]:
        """Stream a blob in chunks; the digest (and size, if given) is checked after the last chunk.

        The request is sent before the first chunk is asked for, so errors such
        as 404 surface on the call, not on iteration. A connection that breaks
        mid-stream is resumed with a Range request from the first missing byte.
        """
        return self._mirrored("open_blob", repo, digest, size)  # type: ignore[no-any-return]

    def _blob_response(self, repo: str, digest: str, what: str, offset: int = 0,
                       end: int | None = None) -> requests.Response:
        headers = {"Accept-Encoding": "identity"}
        if offset or end is not None:
            headers["Range"] = f"bytes={offset}-{'' if end is None else end}"
        return self._request("GET", f"/v2/{repo}/blobs/{digest}", scope=self._scope(repo), what=what,
                             stream=True, headers=headers)

    def _open_blob(self, repo: str, digest: str, size: int | None = None) -> Iterator[bytes]:
        _digest.validate(digest)
        what = f"blob {repo}@{digest}"
        r = self._blob_response(repo, digest, what)
        if r.status_code != 200:
            raise self._error(r, what)
        return self._verified_chunks(r, repo, digest, size, what)

    def _verified_chunks(self, r: requests.Response, repo: str, digest: str, size: int | None,
                         what: str) -> Iterator[bytes]:
        d = _digest.Digester()
        cl = r.headers.get("Content-Length", "")
        total = size if size is not None else (int(cl) if cl.isdigit() else None)
        attempt = 0
        skip = 0
        count = 0
        # sha256 costs about as much as receiving on loopback; hashing chunk k on another
        # thread while chunk k+1 arrives (both release the GIL) hides most of it.
        pending: concurrent.futures.Future[None] | None = None
        try:
            while True:
                try:
                    # The http.client response under urllib3: raw bytes (no Content-Encoding
                    # undone, so the digest is over what was sent) and no per-read buffering.
                    fp = r.raw._fp
                    while True:
                        chunk = fp.read(CHUNK)
                        if not chunk:
                            break
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        count += len(chunk)
                        if total is not None and count > total:
                            raise DigestError(
                                f"registry {self.display}: {what}: more than the expected {total} bytes")
                        if pending is not None:
                            pending.result()
                        pending = _hash_pool().submit(d.update, chunk)
                        yield chunk
                    if getattr(fp, "length", None):
                        # EOF before the Content-Length the server promised: a cut connection.
                        raise _Transient(f"registry {self.display}: {what}: body ended early "
                                         f"after {count} bytes")
                    # Read past requests' back: r.close() would think the body unread and drop the connection.
                    r.raw.release_conn()
                    break
                except (_Transient, *_TRANSFER_ERRORS, OSError) as e:
                    err = e if isinstance(e, _Transient) else self._conn_error(e, what)
                    r.close()
                    if not isinstance(err, _Transient) or attempt >= self.opts.retry.max_retries:
                        raise self._gave_up(err, attempt + 1) from None
                    self._sleep(attempt, None, f"{err}; resuming at byte {count}")
                    attempt += 1
                r, skip = self._resume(repo, digest, what, count)
        finally:
            if pending is not None:
                pending.result()
            r.close()
        if size is not None and count != size:
            raise DigestError(f"registry {self.display}: {what}: got {count} bytes, expected {size}")
        if d.digest() != digest:
            raise DigestError(f"registry {self.display}: {what}: digest mismatch: got {d.digest()}")

    def _resume(self, repo: str, digest: str, what: str, offset: int) -> tuple[requests.Response, int]:
        """Ask for a blob from `offset` on; (response, bytes to skip) - the skip is for a 200 answer."""
        r = self._blob_response(repo, digest, what, offset=offset)
        if r.status_code == 206:
            m = _CONTENT_RANGE_RE.match(r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                r.close()
                raise RegistryError(f"registry {self.display}: {what}: unexpected Content-Range "
                                    f"{r.headers.get('Content-Range', '')!r} when resuming")
            return r, 0
        if r.status_code == 200:
            return r, offset  # the server ignored Range: drop what we already have
        raise self._error(r, what)

    def get_blob(self, repo: str, digest: str, size: int | None = None) -> bytes:
        """A whole blob, verified; fetched again (up to DIGEST_RETRIES times) if it arrives corrupted."""
        for attempt in range(DIGEST_RETRIES + 1):
            try:
                return b"".join(self.open_blob(repo, digest, size))
            except DigestError as e:
                if attempt >= DIGEST_RETRIES or "digest mismatch" not in str(e):
                    raise
                log.warning("%s; fetching the blob again", e)
        raise AssertionError("unreachable")

    def get_blob_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a blob, clipped at its end (callers check span digests).

        Expects 206 with a matching Content-Range; a server that ignores Range
        and answers 200 is read only as far as needed, then the connection is closed.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        if length == 0:
            return b""
        return self._mirrored("get_blob_range", repo, _digest.validate(digest), offset, length)  # type: ignore[no-any-return]

    def get_blob_ranges(self, repo: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges of one blob, in the order asked.

        Overlapping or touching ranges are merged so each merged stretch costs
        one request; each result is clipped at the blob's end like get_blob_range.
        """
        for off, n in ranges:
            if off < 0 or n < 0:
                raise ValueError("offset and length must be non-negative")
        merged = merge_ranges(ranges)
        starts = [off for off, _ in merged]
        datas = [self.get_blob_range(repo, digest, off, n) for off, n in merged]
        out = []
        for off, n in ranges:
            if n == 0:
                out.append(b"")
                continue
            k = bisect.bisect_right(starts, off) - 1
            rel = off - starts[k]
            out.append(datas[k][rel:rel + n])
        return out

    def _get_blob_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        what = f"blob {repo}@{digest} range {offset}+{length}"
        buf = bytearray(length)
        mv = memoryview(buf)
        got = 0
        limit = length  # shrinks when the blob ends before offset+length
        attempt = 0
        deadline = (time.monotonic() + self.opts.request_timeout) if self.opts.request_timeout else None
        while True:
            r = self._blob_response(repo, digest, what, offset + got, offset + length - 1)
            try:
                if r.status_code == 206:
                    limit = self._check_content_range(r, offset, got, length, what)
                    got = self._fill(r, mv, got, limit, deadline, what)
                    if got >= limit:
                        r.raw.release_conn()  # body fully read: keep the connection alive
                elif r.status_code == 200:
                    got, limit = self._fill_ignoring_range(r, mv, offset, got, length, deadline, what)
                elif r.status_code == 416:
                    if got:  # the blob ended exactly where an earlier attempt stopped
                        limit = got
                    else:
                        raise RegistryError(
                            f"registry {self.display}: {what}: range not satisfiable (HTTP 416)")
                else:
                    raise self._error(r, what)
            except _Transient as e:
                # Whatever arrived counts, so the retry asks only for the rest.
                got = max(got, e.progress)
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._gave_up(e, attempt + 1) from None
                if attempt >= self.opts.retry.max_retries:
                    raise self._gave_up(e, attempt + 1) from None
                self._sleep(attempt, e.retry_after, f"{e}; resuming at byte {offset + got}")
                attempt += 1
                continue
            finally:
                r.close()
            if got >= limit:
                return bytes(mv[:limit])

    def _check_content_range(self, r: requests.Response, offset: int, got: int, length: int,
                             what: str) -> int:
        """Validate a 206's Content-Range for a request from offset+got; the usable limit (<= length)."""
        cr = r.headers.get("Content-Range", "")
        m = _CONTENT_RANGE_RE.match(cr)
        if not m or int(m.group(1)) != offset + got:
            raise RegistryError(f"registry {self.display}: {what}: unexpected Content-Range {cr!r}")
        got_end = int(m.group(2))
        end = offset + length - 1
        if got_end != end:
            # Only acceptable when the blob ends before the requested end.
            total = m.group(3)
            if not (total.isdigit() and got_end == int(total) - 1 and got_end < end):
                raise RegistryError(f"registry {self.display}: {what}: unexpected Content-Range {cr!r}")
        return got_end - offset + 1

    def _fill(self, r: requests.Response, mv: memoryview, got: int, limit: int,
              deadline: float | None, what: str) -> int:
        """Read the body straight into mv[got:limit]; raise _Transient on a short or stalled body."""
        fp = r.raw._fp
        try:
            while got < limit:
                n = fp.readinto(mv[got:limit])
                if not n:
                    raise _Transient(f"registry {self.display}: {what}: body ended early "
                                     f"({got} of {limit} bytes)")
                got += n
                if deadline is not None and got < limit and time.monotonic() > deadline:
                    raise _Transient(f"registry {self.display}: {what}: request timed out "
                                     f"({got} of {limit} bytes)")
        except _Transient as e:
            e.progress = got
            raise
        except (*_TRANSFER_ERRORS, OSError, ValueError) as e:
            err = self._conn_error(e, what)
            err.progress = got  # type: ignore[attr-defined]
            raise err from None
        return got

    def _fill_ignoring_range(self, r: requests.Response, mv: memoryview, offset: int, got: int,
                             length: int, deadline: float | None, what: str) -> tuple[int, int]:
        """A 200 answer to a Range request: skip to the offset, read what we lack, then hang up."""
        fp = r.raw._fp
        skip = offset + got
        scratch = bytearray(min(CHUNK, max(skip, 1)))
        try:
            while skip:
                n = fp.readinto(memoryview(scratch)[:min(skip, len(scratch))])
                if not n:
                    if getattr(fp, "length", None):
                        raise _Transient(f"registry {self.display}: {what}: body ended early")
                    raise RegistryError(
                        f"registry {self.display}: {what}: offset is beyond the end of the blob")
                skip -= n
            while got < length:
                n = fp.readinto(mv[got:length])
                if not n:
                    if getattr(fp, "length", None):
                        raise _Transient(f"registry {self.display}: {what}: body ended early")
                    return got, got  # the blob ends inside the range
                got += n
                if deadline is not None and got < length and time.monotonic() > deadline:
                    raise _Transient(f"registry {self.display}: {what}: request timed out")
        except _Transient as e:
            e.progress = got
            raise
        except RegistryError:
            raise
        except (*_TRANSFER_ERRORS, OSError, ValueError) as e:
            err = self._conn_error(e, what)
            err.progress = got  # type: ignore[attr-defined]
            raise err from None
        return got, length

    # --- API: writes --------------------------------------------------

    def push_blob(self, repo: str, digest: str, size: int,
                  data: bytes | str | Path | Iterable[bytes], *, chunked: bool | None = None,
                  mount_from: str | None = None) -> bool:
        """Upload a blob unless the repository already has it; return True if it was added.

        `data` is bytes or a file path (streamed; an iterable is buffered). With
        `mount_from` the registry is first asked to mount the blob from that
        repository (no bytes sent); a 202 answer means it would not, and the
        upload continues in the session it opened. Blobs of at least
        `chunked_upload_threshold` bytes, or any with chunked=True, go up in
        PATCH chunks; others in one PUT. A failed upload starts over (uploads
        are idempotent by digest).
        """
        _digest.validate(digest)
        if self.head_blob(repo, digest) is not None:
            return False
        if not isinstance(data, (str, Path, bytes, bytearray, memoryview)):
            # A one-shot iterable cannot be replayed after a retry, so buffer it.
            data = b"".join(data)
        use_chunks = chunked if chunked is not None else size >= self.opts.chunked_upload_threshold
        what = f"blob upload {repo}@{digest}"
        return self._retrying(lambda: self._upload_once(repo, digest, size, data, use_chunks,  # type: ignore[arg-type]
                                                        mount_from, what), what)  # type: ignore[no-any-return]

    def _upload_once(self, repo: str, digest: str, size: int, data: bytes | str | Path,
                     use_chunks: bool, mount_from: str | None, what: str) -> bool:
        scope = self._scope(repo, push=True)
        url = f"/v2/{repo}/blobs/uploads/"
        if mount_from and mount_from != repo:
            scope += " " + self._scope(mount_from)
            url += "?" + urlencode({"mount": digest, "from": mount_from})
        r = self._request("POST", url, scope=scope, what=what)
        r.close()
        if r.status_code == 201:
            log.info("registry %s: mounted %s into %s from %s", self.display, digest, repo, mount_from)
            return True
        if r.status_code != 202:
            raise self._error(r, what)
        location = self._location(r, what)
        if use_chunks:
            location = self._patch_chunks(location, scope, data, size, what)
            final_body: Any = b""
            headers = {"Content-Length": "0"}
        else:
            final_body = data if not isinstance(data, (str, Path)) else None
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        url = location + ("&" if "?" in location else "?") + urlencode({"digest": digest})
        # No per-request retry: a half-sent PUT leaves the session in an unknown state; start over.
        if final_body is None:
            with open(data, "rb") as f:  # type: ignore[arg-type]
                r = self._request("PUT", url, scope=scope, what=what, headers=headers, data=f, rewind=f,
                                  retry=False)
        else:
            r = self._request("PUT", url, scope=scope, what=what, headers=headers,
                              data=bytes(final_body), retry=False)
        r.close()
        if r.status_code not in (201, 204):
            raise self._error(r, what)
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestError(f"registry {self.display}: {what}: registry stored digest {got}")
        return True

    def _location(self, r: requests.Response, what: str) -> str:
        location = r.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.display}: {what}: upload answer without a Location")
        return urljoin(r.url, location)

    def _patch_chunks(self, location: str, scope: str, data: bytes | str | Path, size: int,
                      what: str) -> str:
        """Send the blob in PATCH requests with Content-Range; the Location to PUT to at the end.

        A chunk that fails in transit (connection, timeout, 5xx) is not the end of the upload: the registry is
        asked how many bytes its session holds (GET on the upload URL) and the upload goes on from there."""
        step = max(1, self.opts.upload_chunk_size)
        f: IO[bytes] | None = open(data, "rb") if isinstance(data, (str, Path)) else None  # noqa: SIM115
        try:
            sent = 0
            resumes = 0
            while sent < size:
                n = min(step, size - sent)
                if f is not None:
                    f.seek(sent)
                chunk = f.read(n) if f is not None else bytes(memoryview(data)[sent:sent + n])  # type: ignore[arg-type]
                if len(chunk) != n:
                    raise RegistryError(f"{what}: source has fewer than {size} bytes")
                try:
                    r = self._request("PATCH", location, scope=scope, what=what, data=chunk, retry=False,
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Range": f"{sent}-{sent + n - 1}",
                                               "Content-Length": str(n)})
                    r.close()
                    if r.status_code == 416:
                        # The registry lost track of our offset; only a fresh upload helps.
                        raise _Restart(str(self._error(r, what)))
                    if r.status_code != 202:
                        raise self._error(r, what)
                except _Transient as exc:
                    if resumes >= self.opts.retry.max_retries:
                        raise
                    self._sleep(resumes, exc.retry_after, f"{exc}; resuming the upload where the registry stands")
                    resumes += 1
                    location, sent = self._upload_status(location, scope, what, size)
                    continue
                location = self._location(r, what)
                sent += n
            return location
        finally:
            if f is not None:
                f.close()

    def _upload_status(self, location: str, scope: str, what: str, size: int) -> tuple[str, int]:
        """(Location, bytes held) of an upload session, from its status (204 with `Range: 0-LAST`).

        Raises _Restart when the session is gone or its answer does not make sense: the upload starts over."""
        try:
            r = self._request("GET", location, scope=scope, what=what, retry=False)
        except _Transient as exc:
            raise _Restart(str(exc)) from None
        r.close()
        m = _UPLOAD_RANGE_RE.fullmatch(r.headers.get("Range", "").strip())
        last = int(m.group(1)) if m is not None else size
        if r.status_code != 204 or last >= size:
            raise _Restart(f"registry {self.display}: {what}: upload status HTTP {r.status_code} "
                           f"(Range {r.headers.get('Range', '')!r}); starting over")
        # `0-0` is also the answer for an empty session: take it as empty (were one byte held, the next PATCH
        # gets a 416 and the upload starts over).
        held = last + 1 if last > 0 else 0
        log.info("registry %s: %s: the upload session holds %d of %d bytes; resuming", self.display, what,
                 held, size)
        return self._location(r, what), held

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> Descriptor:
        """PUT a manifest under a tag or its digest; return its descriptor."""
        d = Descriptor(media_type=media_type, digest=_digest.of_bytes(data), size=len(data))
        if ref.startswith("sha256:") and ref != d.digest:
            raise DigestError(f"manifest push to {repo}@{ref}: content digest is {d.digest}")
        sep = "@" if ref.startswith("sha256:") else ":"
        what = f"manifest push {repo}{sep}{ref}"
        # PUT of the same manifest is idempotent, so the usual retries are safe.
        r = self._request("PUT", f"/v2/{repo}/manifests/{ref}", scope=self._scope(repo, push=True),
                          what=what, headers={"Content-Type": media_type}, data=data)
        r.close()
        if r.status_code not in (200, 201, 202):
            raise self._error(r, what)
        got = r.headers.get("Docker-Content-Digest")
        if got and got != d.digest:
            raise DigestError(
                f"registry {self.display}: {what}: registry computed digest {got}, ours {d.digest}"
            )
        return d

    def delete_manifest(self, repo: str, digest: str) -> None:
        """DELETE a manifest by digest (registries refuse deleting by tag); NotFound if absent."""
        _digest.validate(digest)
        what = f"manifest delete {repo}@{digest}"
        r = self._request("DELETE", f"/v2/{repo}/manifests/{digest}",
                          scope=f"repository:{repo}:delete", what=what)
        r.close()
        if r.status_code not in (200, 202, 204):
            raise self._error(r, what)

    def list_tags(self, repo: str, page_size: int = 1000) -> list[str]:
        """Every tag of `repo`, following `Link: <...>; rel="next"` pagination (`?n=` page size)."""
        what = f"tag list {repo}"
        url: str | None = f"/v2/{repo}/tags/list?" + urlencode({"n": page_size})
        tags: list[str] = []
        seen: set[str] = set()
        while url:
            if url in seen:  # a registry pointing back at a page it already sent
                break
            seen.add(url)
            r = self._request("GET", url, scope=self._scope(repo), what=what,
                              headers={"Accept": "application/json"})
            if r.status_code == 404:
                r.close()
                # distribution answers NAME_UNKNOWN for a repository that has no tags yet.
                return tags
            if r.status_code != 200:
                raise self._error(r, what)
            try:
                body = r.json()
            except ValueError:
                raise RegistryError(f"registry {self.display}: {what}: invalid JSON") from None
            finally:
                r.close()
            page = body.get("tags") if isinstance(body, dict) else None
            if isinstance(page, list):
                tags.extend(t for t in page if isinstance(t, str))
            nxt = _next_link(r.headers.get("Link", ""))
            url = urljoin(r.url, nxt) if nxt else None
        return tags

    def get_referrers(self, repo: str, digest: str, artifact_type: str | None = None) -> bytes | None:
        """The referrers API's image index for `digest`, or None when the registry has no such API.

        None covers 404/405 and any answer that is not an OCI image index (some
        registries route the unknown path to a generic handler).
        """
        _digest.validate(digest)
        what = f"referrers {repo}@{digest}"
        url = f"/v2/{repo}/referrers/{digest}"
        if artifact_type:
            url += "?" + urlencode({"artifactType": artifact_type})
        r = self._request("GET", url, scope=self._scope(repo), what=what,
                          headers={"Accept": mt.OCI_INDEX}, stream=True)
        try:
            if r.status_code in (404, 405, 400):
                # Read the short error body: an unread one makes the pool drop the connection, and the
                # tag lookup that follows would pay for a new one (a round trip more on a remote registry).
                length = r.headers.get("Content-Length", "")
                if length.isdigit() and int(length) <= MAX_ERROR_BODY:
                    with contextlib.suppress(*_TRANSFER_ERRORS, OSError):
                        _ = r.content
                return None
            if r.status_code != 200:
                raise self._error(r, what)
            data = self._read_small(r, what)
        finally:
            r.close()
        ctype = mt.base_type(r.headers.get("Content-Type", ""))
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests"), list):
            return None
        if ctype and ctype != mt.OCI_INDEX and obj.get("mediaType") != mt.OCI_INDEX:
            return None
        return data


_LINK_RE = re.compile(r'<([^>]*)>\s*;[^,]*rel="?next"?')


def _next_link(header: str) -> str | None:
    m = _LINK_RE.search(header)
    return m.group(1) if m else None


_clients: dict[tuple[str, RegistryOptions], RegistryClient] = {}
_clients_lock = threading.Lock()


def get_client(host: str, opts: RegistryOptions | None = None) -> RegistryClient:
    """The shared client for `host` with these options (one session per host and options)."""
    key = (host, opts or RegistryOptions())
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = RegistryClient(host, key[1])
            _clients[key] = c
        return c


def close_clients() -> None:
    with _clients_lock:
        for c in _clients.values():
            c.close()
        _clients.clear()
