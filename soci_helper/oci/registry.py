"""OCI distribution client: auth challenges, manifests, blobs, byte ranges and uploads over requests."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import requests.auth
import urllib3

from .. import digest as _digest
from ..errors import DigestError, NotFound, RegistryError
from . import mediatype as mt
from .auth import Credentials
from .manifest import Descriptor, detect_media_type
from .reference import DOCKER_HUB, DOCKER_HUB_API

CHUNK = 1 << 20
DEFAULT_TIMEOUT = (10.0, 120.0)  # (connect, read) seconds
# Manifests are small; a registry sending more is broken or hostile.
MAX_MANIFEST_BYTES = 4 << 20
_USER_AGENT = "soci-helper/0.1"


@dataclass(frozen=True)
class RegistryOptions:
    plain_http: bool = False
    skip_verify: bool = False
    ca_file: str | None = None
    credentials: Credentials | None = None
    timeout: tuple[float, float] = DEFAULT_TIMEOUT


_TRANSFER_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)


def _raw_chunks(r: requests.Response) -> Iterator[bytes]:
    # Blob bytes exactly as sent: requests would undo a Content-Encoding and
    # the digest would then be taken over different bytes.
    yield from r.raw.stream(CHUNK, decode_content=False)


class _HeaderAuth(requests.auth.AuthBase):
    """Sets (or deliberately leaves out) Authorization.

    Passing an auth object on every request also stops requests from falling
    back to ~/.netrc, which would overwrite the header we chose.
    """

    def __init__(self, value: str | None) -> None:
        self.value = value

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.value:
            r.headers["Authorization"] = self.value
        else:
            r.headers.pop("Authorization", None)
        return r


_CHALLENGE_RE = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse one WWW-Authenticate challenge into (scheme lower-cased, params)."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for m in _CHALLENGE_RE.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


@dataclass
class _Token:
    value: str
    expires: float


class RegistryClient:
    """One registry host: a reused session, its auth state and the API calls we need."""

    def __init__(self, host: str, opts: RegistryOptions | None = None) -> None:
        self.host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.display = host
        self.opts = opts or RegistryOptions()
        scheme = "http" if self.opts.plain_http else "https"
        self.base_url = f"{scheme}://{self.host}"
        self.session = requests.Session()
        self.session.headers["User-Agent"] = _USER_AGENT
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

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- auth ---------------------------------------------------------

    def _basic_value(self) -> str | None:
        c = self.opts.credentials
        if c is None:
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
        params: list[tuple[str, str]] = []
        if challenge.get("service"):
            params.append(("service", challenge["service"]))
        if scope:
            params.append(("scope", scope))
        for s in (extra_scope or "").split(" "):
            if s and s != scope:
                params.append(("scope", s))
        url = realm + ("&" if "?" in realm else "?") + urlencode(params)
        basic = self._basic_value()
        try:
            r = self.session.get(url, auth=_HeaderAuth(basic), timeout=self.opts.timeout,
                                 verify=self._verify)
        except requests.RequestException as e:
            raise self._conn_error(e, f"token service {urlsplit(realm).netloc}") from None
        if r.status_code in (401, 403):
            who = "the given credentials were refused" if basic else "anonymous access was refused"
            raise RegistryError(
                f"registry {self.display}: authentication failed at token service "
                f"{urlsplit(realm).netloc} for {scope} ({who}, HTTP {r.status_code})"
            )
        if r.status_code != 200:
            raise RegistryError(
                f"registry {self.display}: token service {urlsplit(realm).netloc} "
                f"answered HTTP {r.status_code}"
            )
        try:
            body = r.json()
        except ValueError:
            raise RegistryError(f"registry {self.display}: token service returned invalid JSON") from None
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"registry {self.display}: token service returned no token")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 60.0
        # Renew a little early so a token does not expire mid-request.
        tok = _Token(value, time.monotonic() + max(lifetime - 10.0, lifetime / 2))
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

    def _conn_error(self, e: Exception, what: str) -> RegistryError:
        if isinstance(e, (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError)):
            return RegistryError(f"registry {self.display}: connection to {what} broke mid-transfer")
        if isinstance(e, requests.exceptions.SSLError):
            return RegistryError(
                f"registry {self.display}: TLS handshake with {what} failed "
                f"(certificate not trusted? use --tlscacert FILE or --skip-verify)"
            )
        if isinstance(e, requests.exceptions.Timeout):
            return RegistryError(f"registry {self.display}: {what} timed out")
        if isinstance(e, requests.exceptions.ConnectionError):
            return RegistryError(f"registry {self.display}: cannot connect to {what}")
        return RegistryError(f"registry {self.display}: request to {what} failed: {type(e).__name__}")

    def _request(self, method: str, url: str, *, scope: str, what: str, stream: bool = False,
                 headers: dict[str, str] | None = None, data: Any = None,
                 rewind: IO[bytes] | None = None, allow_redirects: bool = True) -> requests.Response:
        """Send one request, answering at most one auth challenge; 401/403 after that is an error."""
        if not url.startswith(("http://", "https://")):
            url = self.base_url + url
        for attempt in range(2):
            if rewind is not None:
                rewind.seek(0)
            try:
                r = self.session.request(
                    method, url, headers=headers, data=data, stream=stream,
                    auth=_HeaderAuth(self._auth_value(scope)), timeout=self.opts.timeout,
                    verify=self._verify, allow_redirects=allow_redirects,
                )
            except requests.RequestException as e:
                raise self._conn_error(e, self.display) from None
            if r.status_code == 401 and attempt == 0:
                r.close()
                self._handle_challenge(r, scope)
                continue
            if r.status_code in (401, 403):
                r.close()
                creds = ("the given credentials were refused" if self.opts.credentials
                         else "no credentials given")
                raise RegistryError(
                    f"registry {self.display}: {what}: authentication failed ({creds}, HTTP {r.status_code})"
                )
            return r
        raise AssertionError("unreachable")

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
        return RegistryError(f"registry {self.display}: {what}: HTTP {r.status_code}{detail}")

    @staticmethod
    def _scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    # --- API ----------------------------------------------------------

    def ping(self) -> None:
        """Check that the host speaks the distribution API and that we may use it."""
        r = self._request("GET", "/v2/", scope="", what="API check")
        if r.status_code != 200:
            raise self._error(r, "API check /v2/")
        r.close()

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, Descriptor]:
        """GET a manifest by tag or digest; return its bytes and a descriptor of exactly those bytes.

        When `ref` is a digest the bytes must hash to it (DigestError otherwise).
        """
        what = f"manifest {repo}:{ref}" if not ref.startswith("sha256:") else f"manifest {repo}@{ref}"
        r = self._request("GET", f"/v2/{repo}/manifests/{ref}", scope=self._scope(repo), what=what,
                          headers={"Accept": mt.MANIFEST_ACCEPT}, stream=True)
        if r.status_code != 200:
            raise self._error(r, what)
        try:
            buf = bytearray()
            for chunk in r.iter_content(CHUNK):
                buf += chunk
                if len(buf) > MAX_MANIFEST_BYTES:
                    raise RegistryError(
                        f"registry {self.display}: {what}: larger than {MAX_MANIFEST_BYTES} bytes"
                    )
        except requests.RequestException as e:
            raise self._conn_error(e, self.display) from None
        finally:
            r.close()
        data = bytes(buf)
        got = _digest.of_bytes(data)
        if ref.startswith("sha256:") and got != ref:
            raise DigestError(f"registry {self.display}: {what}: digest mismatch: got {got}")
        media_type = detect_media_type(data, r.headers.get("Content-Type"))
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
        as 404 surface on the call, not on iteration.
        """
        what = f"blob {repo}@{digest}"
        r = self._request("GET", f"/v2/{repo}/blobs/{_digest.validate(digest)}",
                          scope=self._scope(repo), what=what, stream=True,
                          headers={"Accept-Encoding": "identity"})
        if r.status_code != 200:
            raise self._error(r, what)
        return self._verified_chunks(r, digest, size, what)

    def _verified_chunks(self, r: requests.Response, digest: str, size: int | None,
                         what: str) -> Iterator[bytes]:
        d = _digest.Digester()
        try:
            for chunk in _raw_chunks(r):
                if not chunk:
                    continue
                d.update(chunk)
                if size is not None and d.size > size:
                    raise DigestError(f"registry {self.display}: {what}: more than the expected {size} bytes")
                yield chunk
        except _TRANSFER_ERRORS as e:
            raise self._conn_error(e, self.display) from None
        finally:
            r.close()
        if size is not None and d.size != size:
            raise DigestError(f"registry {self.display}: {what}: got {d.size} bytes, expected {size}")
        if d.digest() != digest:
            raise DigestError(f"registry {self.display}: {what}: digest mismatch: got {d.digest()}")

    def get_blob(self, repo: str, digest: str, size: int | None = None) -> bytes:
        return b"".join(self.open_blob(repo, digest, size))

    def get_blob_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a blob (not verifiable here: callers check span digests).

        Expects 206 with a matching Content-Range; a server that ignores Range
        and answers 200 is read only as far as needed.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        if length == 0:
            return b""
        what = f"blob {repo}@{digest} range {offset}+{length}"
        end = offset + length - 1
        r = self._request("GET", f"/v2/{repo}/blobs/{_digest.validate(digest)}",
                          scope=self._scope(repo), what=what, stream=True,
                          headers={"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"})
        try:
            if r.status_code == 206:
                cr = r.headers.get("Content-Range", "")
                m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", cr)
                if not m or int(m.group(1)) != offset:
                    raise RegistryError(
                        f"registry {self.display}: {what}: unexpected Content-Range {cr!r}"
                    )
                got_end = int(m.group(2))
                if got_end != end:
                    # Only acceptable when the blob ends before the requested end.
                    total = m.group(3)
                    if not (total.isdigit() and got_end == int(total) - 1 and got_end < end):
                        raise RegistryError(
                            f"registry {self.display}: {what}: unexpected Content-Range {cr!r}"
                        )
                want = got_end - offset + 1
                data = self._read_exact(r, want, what, skip=0)
            elif r.status_code == 200:
                data = self._read_exact(r, length, what, skip=offset, allow_short=True)
            elif r.status_code == 416:
                raise RegistryError(f"registry {self.display}: {what}: range not satisfiable (HTTP 416)")
            else:
                raise self._error(r, what)
        finally:
            r.close()
        return data

    def _read_exact(self, r: requests.Response, want: int, what: str, skip: int,
                    allow_short: bool = False) -> bytes:
        buf = bytearray()
        try:
            for chunk in _raw_chunks(r):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                buf += chunk
                if len(buf) >= want:
                    break
        except _TRANSFER_ERRORS as e:
            raise self._conn_error(e, self.display) from None
        if skip:
            raise RegistryError(f"registry {self.display}: {what}: offset is beyond the end of the blob")
        if len(buf) < want and not allow_short:
            raise RegistryError(f"registry {self.display}: {what}: short read ({len(buf)} of {want} bytes)")
        return bytes(buf[:want])

    def push_blob(self, repo: str, digest: str, size: int,
                  data: bytes | str | Path | Iterable[bytes]) -> bool:
        """Upload a blob unless the repository already has it; return True if bytes were sent.

        `data` is bytes or a file path (streamed). POST starts the upload, one
        monolithic PUT with ?digest= finishes it.
        """
        _digest.validate(digest)
        existing = self.head_blob(repo, digest)
        if existing is not None:
            return False
        what = f"blob upload {repo}@{digest}"
        scope = self._scope(repo, push=True)
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope, what=what)
        r.close()
        if r.status_code not in (201, 202):
            raise self._error(r, what)
        if r.status_code == 201:
            return True  # cross-repo mount or already present
        location = r.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.display}: {what}: upload started without a Location")
        url = urljoin(r.url, location)
        url += ("&" if "?" in url else "?") + urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(data, (str, Path)):
            with open(data, "rb") as f:
                r = self._request("PUT", url, scope=scope, what=what, headers=headers, data=f, rewind=f)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            r = self._request("PUT", url, scope=scope, what=what, headers=headers, data=bytes(data))
        else:
            # A one-shot iterable cannot be replayed after an auth retry, so buffer it.
            r = self._request("PUT", url, scope=scope, what=what, headers=headers, data=b"".join(data))
        r.close()
        if r.status_code not in (201, 204):
            raise self._error(r, what)
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestError(f"registry {self.display}: {what}: registry stored digest {got}")
        return True

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> Descriptor:
        """PUT a manifest under a tag or its digest; return its descriptor."""
        d = Descriptor(media_type=media_type, digest=_digest.of_bytes(data), size=len(data))
        if ref.startswith("sha256:") and ref != d.digest:
            raise DigestError(f"manifest push to {repo}@{ref}: content digest is {d.digest}")
        sep = "@" if ref.startswith("sha256:") else ":"
        what = f"manifest push {repo}{sep}{ref}"
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
                return None
            if r.status_code != 200:
                raise self._error(r, what)
            data = self._read_limited(r, what)
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

    def _read_limited(self, r: requests.Response, what: str) -> bytes:
        buf = bytearray()
        try:
            for chunk in r.iter_content(CHUNK):
                buf += chunk
                if len(buf) > MAX_MANIFEST_BYTES:
                    raise RegistryError(
                        f"registry {self.display}: {what}: larger than {MAX_MANIFEST_BYTES} bytes"
                    )
        except requests.RequestException as e:
            raise self._conn_error(e, self.display) from None
        return bytes(buf)


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
