"""config.toml: upstream's sections and key names, parsed with tomllib into typed dataclasses."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import SociError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/soci-snapshotter-grpc/config.toml"


class ConfigError(SociError):
    """config.toml cannot be read or holds a value of the wrong type."""


@dataclass
class HTTPConfig:
    """[http]: retries and timeouts of every registry request (upstream's CamelCase keys)."""

    MaxRetries: int = 8
    MinWaitMsec: int = 30
    MaxWaitMsec: int = 300_000
    DialTimeoutMsec: int = 3_000
    ResponseHeaderTimeoutMsec: int = 3_000
    RequestTimeoutMsec: int = 30_000


@dataclass
class BlobConfig:
    """[blob]: remote layer fetching."""

    valid_interval: int = 60
    check_always: bool = False
    fetching_timeout_sec: int = 300
    force_single_range_mode: bool = False
    max_span_verification_retries: int = 3


@dataclass
class FuseConfig:
    attr_timeout: int = 1
    entry_timeout: int = 1
    negative_timeout: int = 1
    log_fuse_operations: bool = False
    # Each layer server writes what its readers read, in order, next to its state file (soci mounts reads).
    record_reads: bool = False


@dataclass
class BackgroundFetchConfig:
    disable: bool = False
    silence_period_msec: int = 30_000
    fetch_period_msec: int = 500
    max_queue_size: int = 100
    emit_metric_period_sec: int = 10


@dataclass
class CacheConfig:
    """[cache]: the on-disk span cache shared by every layer server."""

    max_size: int = 10 << 30
    min_free_percent: int = 5


@dataclass
class SnapshotterConfig:
    min_layer_size: int = 0
    allow_invalid_mounts_on_restart: bool = False


@dataclass
class PullModeConfig:
    enable: bool = True


@dataclass
class PullModesConfig:
    soci_v1: PullModeConfig = field(default_factory=lambda: PullModeConfig(enable=True))
    soci_v2: PullModeConfig = field(default_factory=lambda: PullModeConfig(enable=True))


@dataclass
class MirrorConfig:
    host: str = ""
    insecure: bool = False
    request_timeout_sec: int = 0
    header: dict[str, Any] = field(default_factory=dict)


@dataclass
class HostConfig:
    mirrors: list[MirrorConfig] = field(default_factory=list)


@dataclass
class ResolverConfig:
    """[resolver.host."<registry>"]: mirrors tried before the registry itself."""

    host: dict[str, HostConfig] = field(default_factory=dict)


@dataclass
class Config:
    metrics_address: str = ""
    mount_timeout_sec: int = 30
    disable_verification: bool = False
    http: HTTPConfig = field(default_factory=HTTPConfig)
    blob: BlobConfig = field(default_factory=BlobConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    pull_modes: PullModesConfig = field(default_factory=PullModesConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)


def _convert(value: Any, typ: Any, where: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config: [{where}] must be a table")
        return _build(typ, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {where} must be an array")
        (item,) = typ.__args__
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {where} must be a table")
        _, item = typ.__args__
        return {k: _convert(v, item, f'{where}."{k}"') for k, v in value.items()}
    if typ is Any:
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {where} must be true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {where} must be an integer")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string")
        return value
    raise ConfigError(f"config: {where}: unsupported type")  # pragma: no cover


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in hints:
            # Upstream has many keys we do not act on; say so instead of failing the daemon.
            log.warning("config: ignoring unknown key %s", f"{where}.{key}" if where else key)
            continue
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def parse(text: str, source: str = "config") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return _build(Config, doc, "")


def load(path: str | Path | None = None, required: bool = False) -> Config:
    """Read config.toml; a missing file gives the defaults unless `required`."""
    p = Path(path or DEFAULT_CONFIG_PATH)
    try:
        text = p.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {p} does not exist") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    return parse(text, str(p))


def to_toml(cfg: Config) -> str:
    """The configuration as TOML (for `config default|dump`)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            tables.append((f.name, v))
        else:
            lines.append(f"{f.name} = {_toml_value(v)}")
    for name, v in tables:
        _emit_table(lines, name, v)
    return "\n".join(lines) + "\n"


def _emit_table(lines: list[str], name: str, obj: Any) -> None:
    scalars, subs = [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            subs.append((f"{name}.{f.name}", v))
        elif isinstance(v, dict) and v and all(dataclasses.is_dataclass(x) for x in v.values()):
            subs.extend((f'{name}.{f.name}."{k}"', x) for k, x in v.items())
        elif isinstance(v, list) and v and all(dataclasses.is_dataclass(x) for x in v):
            subs.extend((f"[{name}.{f.name}]", x) for x in v)
        else:
            scalars.append(f"{f.name} = {_toml_value(v)}")
    lines.append("")
    lines.append(f"[{name}]")  # array items arrive as "[a.b]", giving "[[a.b]]"
    lines.extend(scalars)
    for sub_name, sub in subs:
        _emit_table(lines, sub_name, sub)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))
