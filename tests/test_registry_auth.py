"""Registry authentication for real: htpasswd over TLS, bearer tokens from a JWT issuer, docker config, helpers."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.registry import BuiltImage, LocalRegistry, build_image
from support.tokenauth import TokenIssuer

from soci_helper import digest
from soci_helper.errors import RegistryError
from soci_helper.oci import auth
from soci_helper.oci.auth import Credentials
from soci_helper.oci.credhelper import run_helper
from soci_helper.oci.registry import RegistryClient, RegistryOptions
from soci_helper.oci.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)

SECRET = "Pa55-wOrd-never-logged"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> BuiltImage:
    return build_image(tmp_path_factory.mktemp("img") / "single", tag="v1")


@pytest.fixture(scope="module")
def issuer() -> Iterator[TokenIssuer]:
    with TokenIssuer({"alice": SECRET}, lifetime=2) as iss:
        yield iss


@pytest.fixture(scope="module")
def token_reg(issuer: TokenIssuer, image: BuiltImage) -> Iterator[LocalRegistry]:
    with LocalRegistry(token_auth=issuer.registry_settings("alice")) as reg:
        reg.push_oci_layout(image.path, "tok/app:v1", tag="v1")
        yield reg


@pytest.fixture(scope="module")
def tls_reg(image: BuiltImage) -> Iterator[LocalRegistry]:
    with LocalRegistry(tls=True, auth=True, password=SECRET) as reg:
        reg.push_oci_layout(image.path, "tls/app:v1", tag="v1")
        yield reg


def test_basic_auth_over_tls(tls_reg: LocalRegistry, image: BuiltImage) -> None:
    opts = RegistryOptions(ca_file=tls_reg.ca_file, credentials=Credentials(tls_reg.user, SECRET))
    with RegistryClient(tls_reg.host, opts) as c:
        _, desc = c.get_manifest("tls/app", "v1")
        assert desc.digest == image.top_digest
    with RegistryClient(tls_reg.host, RegistryOptions(skip_verify=True,
                                                      credentials=Credentials(tls_reg.user, SECRET))) as c:
        assert c.head_manifest("tls/app", "v1") is not None
    plain_opts = RegistryOptions(credentials=Credentials(tls_reg.user, SECRET))
    with RegistryClient(tls_reg.host, plain_opts) as c, pytest.raises(RegistryError, match="TLS"):
        c.ping()  # the test CA is in no system store


def test_token_auth_pull_push_and_scopes(token_reg: LocalRegistry, issuer: TokenIssuer,
                                         image: BuiltImage) -> None:
    with RegistryClient(token_reg.host, RegistryOptions(plain_http=True,
                                                        credentials=Credentials("alice", SECRET))) as c:
        _, desc = c.get_manifest("tok/app", "v1")
        assert desc.digest == image.top_digest
        data = os.urandom(5000)
        d = digest.of_bytes(data)
        assert c.push_blob("tok/other", d, len(data), data) is True
        layer = next(iter(image.layers))
        assert c.push_blob("tok/copy", layer, len(image.layers[layer]), b"", mount_from="tok/app") is True
    scopes = [" ".join(r["scopes"]) for r in issuer.granted()]
    assert any("repository:tok/other:pull,push" in s for s in scopes)
    assert any("repository:tok/copy:pull,push" in s and "repository:tok/app:pull" in s for s in scopes)
    # Anonymous: the issuer grants nothing, the registry refuses.
    with RegistryClient(token_reg.host, RegistryOptions(plain_http=True)) as c, \
            pytest.raises(RegistryError, match="authentication failed"):
        c.get_manifest("tok/app", "v1")


@pytest.mark.parametrize("advertised", [None, 300], ids=["expires_in-honest", "expires_in-lies"])
def test_expiring_tokens_do_not_fail_reads(token_reg: LocalRegistry, issuer: TokenIssuer,
                                           image: BuiltImage, advertised: int | None) -> None:
    issuer.advertised_lifetime = advertised  # with a lie only the registry's 401 reveals expiry
    try:
        layer = next(iter(image.layers))
        want = image.layers[layer]
        before = len(issuer.granted())
        opts = RegistryOptions(plain_http=True, credentials=Credentials("alice", SECRET))
        with RegistryClient(token_reg.host, opts) as c:
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < 5.0:  # spans two expiries of the 2 s tokens
                assert c.get_blob_range("tok/app", layer, n % 100, 1000) == want[n % 100:n % 100 + 1000]
                n += 1
                time.sleep(0.1)
        assert len(issuer.granted()) - before >= 3
    finally:
        issuer.advertised_lifetime = None


def test_docker_config_auths_and_credential_helper(tls_reg: LocalRegistry, tmp_path: Path,
                                                    monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    entry = base64.b64encode(f"{tls_reg.user}:{SECRET}".encode()).decode()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"auths": {tls_reg.host: {"auth": entry}}}))
    creds = auth.resolve_credentials(tls_reg.host)
    assert creds == Credentials(tls_reg.user, SECRET)

    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper-argv"
    helper = bindir / "docker-credential-test"
    helper.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'read server\n'
        f'if [ "$server" = "{tls_reg.host}" ]; then\n'
        f'  printf \'{{"ServerURL":"%s","Username":"{tls_reg.user}","Secret":"{SECRET}"}}\' "$server"\n'
        "else\n"
        "  echo 'credentials not found in native keychain'; exit 1\n"
        "fi\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"credHelpers": {tls_reg.host: "test"}}))
    creds = auth.resolve_credentials(tls_reg.host)
    assert creds == Credentials(tls_reg.user, SECRET)
    assert run_helper("test", "elsewhere.example") is None
    assert SECRET not in log.read_text() and log.read_text().split() == ["get", "get"]
    assert run_helper("missing-helper", tls_reg.host) is None
    with RegistryClient(tls_reg.host, RegistryOptions(ca_file=tls_reg.ca_file, credentials=creds)) as c:
        assert c.head_manifest("tls/app", "v1") is not None


def test_secrets_never_leak(tls_reg: LocalRegistry, token_reg: LocalRegistry, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = Credentials("alice", SECRET + "-wrong")
    errors: list[str] = []
    fast = RetryPolicy(max_retries=1, min_wait=0.01, max_wait=0.05)
    for host, opts in [
        (tls_reg.host, RegistryOptions(ca_file=tls_reg.ca_file, credentials=wrong, retry=fast)),
        (token_reg.host, RegistryOptions(plain_http=True, credentials=wrong, retry=fast)),
        ("127.0.0.1:9", RegistryOptions(plain_http=True, credentials=wrong, retry=fast)),
    ]:
        with RegistryClient(host, opts) as c:
            assert SECRET not in repr(c) and SECRET not in repr(c.opts)
            with pytest.raises(RegistryError) as ei:
                c.get_manifest("tls/app", "v1")
            errors.append(str(ei.value) + repr(ei.value))
    for text in errors + [r.getMessage() for r in caplog.records]:
        assert SECRET not in text
        assert base64.b64encode(f"alice:{SECRET}-wrong".encode()).decode() not in text
