"""Image references: parsing `host[:port]/repo[:tag][@sha256:...]` the way docker and containerd do."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..digest import validate as validate_digest
from ..errors import DigestError, ReferenceError_

DOCKER_HUB = "docker.io"
# The host the Docker Hub registry API actually answers on.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference; `tag` is None only when `digest` pins the image."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] to send registry API requests to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def object(self) -> str:
        """What to put after `/manifests/`: the digest when pinned, else the tag."""
        if self.digest:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.match(tag):
            raise ReferenceError_(f"invalid tag {tag!r}")
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def normalize_registry_host(host: str) -> str:
    """Map the Docker Hub aliases to `docker.io`; other hosts are returned unchanged (lower-cased)."""
    h = host.lower()
    return DOCKER_HUB if h in _HUB_ALIASES else h


def _is_host_component(component: str) -> bool:
    # Docker's rule: the first path component names a registry only if it
    # looks like one (a dot, a port, localhost, or upper case, which a
    # repository name can never contain).
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


def parse_reference(text: str) -> Reference:
    """Parse a registry image reference; raise ReferenceError_ with one line saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ReferenceError_("empty image reference")
    s = text.strip()
    if s != text or any(c.isspace() for c in s):
        raise ReferenceError_(f"invalid image reference {text!r}: contains whitespace")
    if s.startswith("docker://"):
        s = s[len("docker://"):]
    if "://" in s:
        raise ReferenceError_(f"invalid image reference {text!r}: a reference has no URL scheme")

    digest: str | None = None
    if "@" in s:
        s, digest = s.split("@", 1)
        try:
            validate_digest(digest)
        except DigestError:
            raise ReferenceError_(
                f"invalid image reference {text!r}: bad digest {digest!r} (want sha256:<64 hex>)"
            ) from None

    tag: str | None = None
    # A tag is after the last ':' that comes after the last '/', so that a
    # registry port is not mistaken for a tag.
    slash = s.rfind("/")
    colon = s.rfind(":")
    if colon > slash:
        s, tag = s[:colon], s[colon + 1:]
        if not _TAG_RE.match(tag):
            raise ReferenceError_(f"invalid image reference {text!r}: bad tag {tag!r}")

    if not s:
        raise ReferenceError_(f"invalid image reference {text!r}: no repository name")

    first, sep, rest = s.partition("/")
    if sep and _is_host_component(first):
        registry, path = first, rest
        if not _HOST_RE.match(registry):
            raise ReferenceError_(f"invalid image reference {text!r}: bad registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, s
    registry = normalize_registry_host(registry)

    if not path:
        raise ReferenceError_(f"invalid image reference {text!r}: no repository name")
    components = path.split("/")
    for comp in components:
        if not _PATH_COMPONENT_RE.match(comp):
            if comp.lower() != comp:
                raise ReferenceError_(
                    f"invalid image reference {text!r}: repository name must be lowercase"
                )
            raise ReferenceError_(f"invalid image reference {text!r}: bad repository component {comp!r}")
    if registry == DOCKER_HUB and len(components) == 1:
        if _HEX64_RE.match(path):
            raise ReferenceError_(
                f"invalid image reference {text!r}: repository name cannot be a 64-character hex string"
            )
        path = "library/" + path
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise ReferenceError_(f"invalid image reference {text!r}: name longer than {_MAX_NAME} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def familiar_name(ref: Reference) -> str:
    """The short form docker prints (`ubuntu:22.04` for `docker.io/library/ubuntu:22.04`)."""
    name = ref.name
    if ref.registry == DOCKER_HUB:
        name = ref.repository
        if name.startswith("library/") and name.count("/") == 1:
            name = name[len("library/"):]
    s = name
    if ref.tag:
        s += ":" + ref.tag
    if ref.digest:
        s += "@" + ref.digest
    return s
