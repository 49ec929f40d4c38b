"""config.toml parsing: upstream's keys, type errors as one line, round trips, insecure hosts."""

from __future__ import annotations

import logging

import pytest

from soci_helper import config as c
from soci_helper.oci.mirrors import insecure_host, mirrors_for


def test_defaults_and_upstream_keys():
    cfg = c.parse(
        """
metrics_address = "127.0.0.1:9880"
[http]
MaxRetries = 2
[background_fetch]
disable = true
[pull_modes.soci_v1]
enable = false
[[resolver.host."10.0.0.2:5000".mirrors]]
host = "10.0.0.2:5000"
insecure = true
[[resolver.host."docker.io".mirrors]]
host = "https://mirror.example:443/"
"""
    )
    assert cfg.metrics_address == "127.0.0.1:9880"
    assert cfg.http.MaxRetries == 2 and cfg.http.MinWaitMsec == 30
    assert cfg.background_fetch.disable and cfg.background_fetch.fetch_period_msec == 500
    assert not cfg.pull_modes.soci_v1.enable and cfg.pull_modes.soci_v2.enable
    assert cfg.cache.max_size == 10 << 30
    assert insecure_host(cfg, "10.0.0.2:5000")
    assert not insecure_host(cfg, "docker.io")
    assert [m.host for m in mirrors_for(cfg, "docker.io")] == ["mirror.example:443"]
    assert not insecure_host(c.Config(), "10.0.0.2:5000")


def test_round_trip_through_toml():
    cfg = c.Config()
    cfg.snapshotter.min_layer_size = 123
    cfg.resolver.host["r:5000"] = c.HostConfig([c.MirrorConfig(host="m:5000", insecure=True)])
    assert c.parse(c.to_toml(cfg)) == cfg


@pytest.mark.parametrize(
    "text, what",
    [
        ("[http]\nMaxRetries = 'x'", "http.MaxRetries must be an integer"),
        ("[fuse]\nattr_timeout = true", "fuse.attr_timeout must be an integer"),
        ("[background_fetch]\ndisable = 1", "background_fetch.disable must be true or false"),
        ("http = 3", "[http] must be a table"),
        ("[[resolver.host.x.mirrors]]\nhost = 5", "host must be a string"),
        ("not toml [", "invalid TOML"),
    ],
)
def test_bad_values_are_one_clear_error(text, what):
    with pytest.raises(c.ConfigError, match=what.replace("[", r"\[").replace("]", r"\]")):
        c.parse(text)


def test_unknown_keys_are_logged_not_fatal(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = c.parse("[blob]\nnot_a_key = 1\n[kubeconfig_keychain]\nenable_keychain = false\n")
    assert cfg.blob == c.BlobConfig()
    assert "blob.not_a_key" in caplog.text and "kubeconfig_keychain" in caplog.text


def test_load(tmp_path):
    assert c.load(tmp_path / "absent.toml") == c.Config()
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.load(tmp_path / "absent.toml", required=True)
    p = tmp_path / "config.toml"
    p.write_text("[cache]\nmax_size = 1024\n")
    assert c.load(p).cache.max_size == 1024
