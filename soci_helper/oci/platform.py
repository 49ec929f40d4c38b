"""Platforms (os/arch/variant): the host's, parsing `os/arch[/variant]`, normalising and matching."""

from __future__ import annotations

import platform as _pyplatform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ReferenceError_


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        if self.variant:
            s += "/" + self.variant
        return s

    def to_json(self) -> dict[str, Any]:
        # Field order of the OCI Go struct: architecture, os, os.version, os.features, variant.
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Platform:
        if not isinstance(obj, Mapping):
            raise ReferenceError_("invalid platform: not a JSON object")
        os_ = obj.get("os", "")
        arch = obj.get("architecture", "")
        variant = obj.get("variant", "") or ""
        os_version = obj.get("os.version", "") or ""
        features = obj.get("os.features") or []
        if not all(isinstance(v, str) for v in (os_, arch, variant, os_version)):
            raise ReferenceError_("invalid platform: os, architecture and variant must be strings")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ReferenceError_("invalid platform: os.features must be a list of strings")
        return cls(os_, arch, variant, os_version, tuple(features))


_OS_ALIASES = {"macos": "darwin"}


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch = arch.lower()
    variant = variant.lower()
    if arch in ("i386", "i486", "i586", "i686", "386"):
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        # v1 is the baseline every amd64 machine meets, so it says nothing.
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        # v8 is the arm64 baseline; images and hosts spell it either way.
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
        return "arm", variant
    return arch, variant


def normalize(p: Platform) -> Platform:
    """Canonical form used for comparisons (aliases folded, baseline variants dropped)."""
    os_ = p.os.lower()
    os_ = _OS_ALIASES.get(os_, os_)
    arch, variant = _normalize_arch(p.architecture, p.variant)
    return Platform(os_, arch, variant, p.os_version, p.os_features)


def parse_platform(text: str) -> Platform:
    """Parse `os/arch[/variant]` (or `os` or `arch` alone, filled in from the host)."""
    parts = text.strip().split("/")
    if not text.strip() or len(parts) > 3 or any(not p for p in parts):
        raise ReferenceError_(f"invalid platform {text!r}: want os/arch[/variant], e.g. linux/amd64")
    host = host_platform()
    if len(parts) == 1:
        # containerd accepts a lone OS or architecture.
        word = parts[0].lower()
        if word in ("linux", "windows", "darwin", "macos", "freebsd"):
            return normalize(Platform(word, host.architecture, host.variant))
        return normalize(Platform(host.os, word))
    os_, arch = parts[0], parts[1]
    variant = parts[2] if len(parts) == 3 else ""
    return normalize(Platform(os_, arch, variant))


def _arm_variant_from_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() == "cpu architecture":
                    v = value.strip()
                    if v.isdigit():
                        return "v" + v
                    return "v7"
    except OSError:
        pass
    return "v7"


def host_platform() -> Platform:
    """The platform of this machine, as containerd would report it (arm64 shows variant v8)."""
    if sys.platform.startswith("linux"):
        os_ = "linux"
    elif sys.platform == "darwin":
        os_ = "darwin"
    elif sys.platform in ("win32", "cygwin"):
        os_ = "windows"
    else:
        os_ = sys.platform.rstrip("0123456789")
    arch, variant = _normalize_arch(_pyplatform.machine() or "unknown", "")
    if arch == "arm64":
        variant = "v8"
    elif arch == "arm":
        variant = _arm_variant_from_cpuinfo()
        if variant == "v8":
            # A 32-bit userland on an ARMv8 CPU runs v7 binaries.
            variant = "v7"
    return Platform(os_, arch, variant)


def _variant_rank(arch: str, want: str, have: str) -> int | None:
    if want == have:
        return 0
    if arch == "arm" and want.startswith("v") and have.startswith("v"):
        # An ARMv7 host also runs v6 and v5 images; prefer the closest.
        try:
            w, h = int(want[1:]), int(have[1:])
        except ValueError:
            return None
        return (w - h) if w - h > 0 else None
    if arch == "amd64" and want.startswith("v"):
        # x86-64 micro-architecture levels are cumulative: a v3 host runs v2 and v1.
        try:
            w = int(want[1:])
            h = int(have[1:]) if have else 1
        except ValueError:
            return None
        return (w - h) if w - h > 0 else None
    return None


def match_rank(want: Platform, have: Platform | None) -> int | None:
    """How well `have` suits a host or request `want`: 0 is exact, larger is worse, None is no match."""
    if have is None:
        return None
    w, h = normalize(want), normalize(have)
    if w.os != h.os or w.architecture != h.architecture:
        return None
    return _variant_rank(w.architecture, w.variant, h.variant)


def matches(want: Platform, have: Platform | None) -> bool:
    return match_rank(want, have) is not None
