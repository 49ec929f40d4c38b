"""The project's exception hierarchy: every failure a user can cause is one of these."""

from __future__ import annotations


class SociError(Exception):
    """Base of every error the CLI reports as one line and a non-zero exit."""

    exit_code = 1


class DigestError(SociError):
    """A digest string is malformed, or content does not match its digest."""


class ZtocError(SociError):
    """A zTOC (flatbuffer or checkpoint blob) is malformed or inconsistent."""


class LayerError(SociError):
    """A layer cannot be indexed: bad compression, bad tar, refused entry type."""


class ReferenceError_(SociError):
    """An image reference or image source string cannot be parsed or resolved."""


class RegistryError(SociError):
    """The registry refused, failed or returned something invalid."""


class StoreError(SociError):
    """The local content store or artifacts database cannot do what was asked."""


class NotFound(SociError):
    """An artifact, blob, manifest or file that was named does not exist."""
