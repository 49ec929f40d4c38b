"""A throw-away `docker-registry` on loopback, for the demo, the benchmarks and the tests.

It always stops and its temporary directory is removed, even when starting it fails half way.
The TLS variant's CA exists only in that directory, so a client that succeeds must have been
given the CA file explicitly.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT = 20.0

# One combined-log-format line: 127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 206 1234 "referer" "agent"
_ACCESS_RE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
)


@dataclass(frozen=True, slots=True)
class AccessEntry:
    method: str
    path: str
    status: int
    size: int


class RegistryStartError(RuntimeError):
    """The registry process could not be started or never became ready."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def make_test_ca_and_cert(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                          ) -> tuple[Path, Path, Path]:
    """Create a throw-away CA and a server certificate for `hosts`: (ca.crt, server.crt, server.key)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt = d / "server.key", d / "server.csr", d / "server.crt"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
          "-subj", "/CN=soci-helper test CA",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign",
          "-addext", "subjectKeyIdentifier=hash"])
    _run(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}"])
    sans = ",".join(("IP:" if h.replace(".", "").isdigit() or ":" in h else "DNS:") + h for h in hosts)
    ext = d / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        f"subjectAltName={sans}\n"
    )
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
          "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext)])
    return ca_crt, crt, key


@dataclass(frozen=True)
class TokenAuth:
    """Settings for the registry's `auth: token` mode; the issuer itself runs elsewhere.

    `rootcertbundle` is the PEM certificate (bundle) whose keys sign the issuer's
    tokens; `user`/`password` are what the issuer accepts (used for pushing).
    """

    realm: str
    service: str
    issuer: str
    rootcertbundle: str
    user: str = ""
    password: str = field(default="", repr=False)


class LocalRegistry:
    """A real `docker-registry` (distribution 2.8) on a free 127.0.0.1 port with its own storage.

    tls=True serves HTTPS with a certificate from a test CA (see `ca_file`);
    auth=True adds htpasswd Basic auth for `user`/`password` (the registry
    only allows htpasswd over TLS, so auth implies tls).
    token_auth=TokenAuth(...) makes the registry demand bearer tokens from an
    external issuer (plain HTTP unless tls=True); pushes then use its user/password.
    """

    def __init__(self, tls: bool = False, auth: bool = False, user: str = "tester",
                 password: str = "s3cret-pw", workdir: str | Path | None = None,
                 token_auth: TokenAuth | None = None) -> None:
        if auth and token_auth is not None:
            raise ValueError("htpasswd auth and token auth are exclusive")
        self.tls = tls or auth
        self.auth = auth
        self.token_auth = token_auth
        self.user = token_auth.user if token_auth else user
        self.password = token_auth.password if token_auth else password
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else None
        self.port = 0
        self.ca_file: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    # --- properties a client needs ------------------------------------

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def creds(self) -> str | None:
        """`user:password` when auth is on (what --user / --dest-creds take)."""
        return f"{self.user}:{self.password}" if self.auth or (self.token_auth and self.user) else None

    def source_options(self, **overrides: Any) -> Any:
        """SourceOptions for this registry (plain_http, ca_file, user), with overrides."""
        from soci_helper.oci.source import SourceOptions

        kw: dict[str, Any] = {"plain_http": not self.tls, "ca_file": self.ca_file, "user": self.creds}
        kw.update(overrides)
        return SourceOptions(**kw)

    def requests_kwargs(self) -> dict[str, Any]:
        """verify=/auth= for calling the registry directly with requests."""
        kw: dict[str, Any] = {"verify": self.ca_file if self.tls else True, "timeout": 10}
        if self.auth:
            kw["auth"] = (self.user, self.password)
        return kw

    # --- lifecycle ----------------------------------------------------

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            return
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="soci-test-registry-"))
        try:
            self._prepare()
            last: Exception | None = None
            # A free port can be taken between choosing and binding it; retry.
            for _ in range(3):
                try:
                    self._spawn()
                    return
                except RegistryStartError as e:
                    last = e
                    self._kill()
            raise RegistryStartError(str(last))
        except BaseException:
            self.stop()
            raise

    def _prepare(self) -> None:
        assert self.dir is not None
        (self.dir / "storage").mkdir(parents=True, exist_ok=True)
        if self.tls:
            ca, crt, key = make_test_ca_and_cert(self.dir / "tls")
            self.ca_file, self._crt, self._key = str(ca), str(crt), str(key)
        if self.auth:
            r = _run(["htpasswd", "-Bbn", self.user, self.password])
            (self.dir / "htpasswd").write_text(r.stdout)

    def _config(self) -> str:
        assert self.dir is not None
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.dir / 'storage'}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {os.urandom(16).hex()}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self._crt}", f"    key: {self._key}"]
        if self.auth:
            lines += ["auth:", "  htpasswd:", "    realm: soci-test", f"    path: {self.dir / 'htpasswd'}"]
        if self.token_auth is not None:
            t = self.token_auth
            lines += ["auth:", "  token:", f"    realm: {t.realm}", f"    service: {t.service}",
                      f"    issuer: {t.issuer}", f"    rootcertbundle: {t.rootcertbundle}"]
        return "\n".join(lines) + "\n"

    def _spawn(self) -> None:
        assert self.dir is not None
        self.port = _free_port()
        cfg = self.dir / "config.yml"
        cfg.write_text(self._config())
        self._log = self.dir / "registry.log"
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                ["docker-registry", "serve", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        verify: bool | str = self.ca_file if self.tls and self.ca_file else True
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RegistryStartError(
                    f"docker-registry exited ({self._proc.returncode}): {self.log_tail()}"
                )
            try:
                r = requests.get(self.url + "/v2/", verify=verify, timeout=2)
                if r.status_code in (200, 401):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RegistryStartError(f"docker-registry not ready after {START_TIMEOUT}s: {self.log_tail()}")

    def access_log(self) -> list[AccessEntry]:
        """Every request the registry has answered so far, parsed from its combined-format access log."""
        try:
            text = self._log.read_text(errors="replace") if self._log else ""
        except OSError:
            return []
        out = []
        for m in _ACCESS_RE.finditer(text):
            size = m.group("size")
            out.append(AccessEntry(m.group("method"), m.group("path"), int(m.group("status")),
                                   int(size) if size.isdigit() else 0))
        return out

    def bytes_served(self, path_part: str = "/blobs/") -> int:
        """Body bytes sent for requests whose path contains `path_part` (blob bytes by default)."""
        return sum(e.size for e in self.access_log() if path_part in e.path)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self._log.read_text(errors="replace")[-n:] if self._log else ""
        except OSError:
            return ""

    def _kill(self) -> None:
        p, self._proc = self._proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)

    def stop(self) -> None:
        """Stop the process and remove the temp dir (idempotent)."""
        try:
            self._kill()
        finally:
            if self._own_dir and self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    # --- content ------------------------------------------------------

    def push_oci_layout(self, layout_dir: str | Path, ref: str, tag: str = "latest",
                        fmt: str | None = None, all_platforms: bool = True) -> str:
        """Copy `oci:DIR:TAG` to `HOST/ref` with skopeo; `ref` is `repo[:tag]` without the host.

        fmt="v2s2" converts to Docker media types. Returns the full reference.
        """
        target = f"{self.host}/{ref}"
        policy = Path(tempfile.mkdtemp(prefix="soci-test-policy-")) / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        cmd = ["skopeo", "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false"]
        if self.creds:
            # An auth file rather than --dest-creds keeps the password out of argv.
            authfile = policy.parent / "auth.json"
            token = base64.b64encode(self.creds.encode()).decode("ascii")
            authfile.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
            authfile.chmod(0o600)
            cmd += ["--dest-authfile", str(authfile)]
        if fmt:
            cmd += ["--format", fmt]
        else:
            # Otherwise skopeo compresses uncompressed layers on the way, and digests change.
            cmd.append("--preserve-digests")
        if all_platforms:
            cmd.append("--all")
        cmd += [f"oci:{layout_dir}:{tag}", f"docker://{target}"]
        try:
            _run(cmd)
        finally:
            shutil.rmtree(policy.parent, ignore_errors=True)
        return target
