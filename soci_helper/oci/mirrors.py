"""Registry mirrors from config.toml `[[resolver.host."<registry>".mirrors]]`: where reads go first."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config
from .reference import DOCKER_HUB, DOCKER_HUB_API, normalize_registry_host


@dataclass(frozen=True)
class Mirror:
    """One mirror endpoint. `plain_http` is upstream's `insecure` (talk HTTP, not HTTPS)."""

    host: str
    plain_http: bool = False
    request_timeout: float | None = None
    # Extra request headers from the config; they may hold a token, so keep them out of repr.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def _host_keys(host: str) -> list[str]:
    h = normalize_registry_host(host)
    keys = [host, h]
    if h == DOCKER_HUB:
        keys += [DOCKER_HUB_API, "index.docker.io"]
    return list(dict.fromkeys(keys))


def mirrors_for(cfg: Config, host: str) -> tuple[Mirror, ...]:
    """The configured mirrors of `host`, in config order (first tried first)."""
    table = cfg.resolver.host
    for key in _host_keys(host):
        hc = table.get(key)
        if hc is None:
            continue
        out = []
        for m in hc.mirrors:
            mhost = m.host.strip()
            plain = m.insecure
            # Accept a URL as well as a bare host; the scheme then decides.
            if mhost.startswith("http://"):
                mhost, plain = mhost[len("http://"):], True
            elif mhost.startswith("https://"):
                mhost = mhost[len("https://"):]
            mhost = mhost.rstrip("/")
            if not mhost:
                continue
            hdrs = tuple(sorted((str(k), ", ".join(map(str, v)) if isinstance(v, list) else str(v))
                                for k, v in m.header.items()))
            out.append(Mirror(mhost, plain, float(m.request_timeout_sec) or None, hdrs))
        return tuple(out)
    return ()


def insecure_host(cfg: Config, host: str) -> bool:
    """True when config lists `host` as its own insecure mirror: upstream's way to say "plain HTTP here"."""
    return any(m.plain_http and m.host == host for m in mirrors_for(cfg, host))
