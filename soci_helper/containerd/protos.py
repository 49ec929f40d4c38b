"""Python stubs for containerd 1.6's gRPC API, generated from its .proto files at first use into a cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import SociError

log = logging.getLogger(__name__)

# Where distributions put containerd's Go API tree (Debian: golang-github-containerd-containerd-dev).
PROTO_ENV = "SOCI_CONTAINERD_PROTOS"
CACHE_ENV = "SOCI_PROTO_CACHE"
_GO_IMPORT = "github.com/containerd/containerd/api/"
_CANDIDATES = ("/usr/share/gocode/src/github.com/containerd/containerd/api",)

# The generated modules import each other by proto path; rewriting containerd's Go import path to our
# package path makes those imports land in `soci_helper.containerd.api`, whose __path__ is the cache dir.
PY_PREFIX = "soci_helper/containerd/api/"

# Services `soci` talks to (snapshots is also served by the daemon); their imports are followed.
ROOT_PROTOS = (
    "services/snapshots/v1/snapshots.proto",
    "services/content/v1/content.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "services/diff/v1/diff.proto",
    "services/namespaces/v1/namespace.proto",
    "types/mount.proto",
)

# Bump when the rewriting below changes, so old caches are not reused.
_GENERATOR_REV = "1"


class ProtoError(SociError):
    """containerd's API protos are missing, or the stubs cannot be generated from them."""


def find_proto_root() -> Path:
    """The directory holding containerd's `types/` and `services/` protos."""
    env = os.environ.get(PROTO_ENV)
    candidates = [env] if env else list(_CANDIDATES)
    for c in candidates:
        p = Path(c)
        if (p / "services/snapshots/v1/snapshots.proto").is_file():
            return p
    where = env or ", ".join(_CANDIDATES)
    raise ProtoError(
        f"containerd API .proto files not found in {where} "
        f"(install golang-github-containerd-containerd-dev or set {PROTO_ENV} to containerd's api/ directory)"
    )


_IMPORT_RE = re.compile(r'^\s*import\s+(?:weak\s+|public\s+)?"([^"]+)"\s*;', re.M)
_GOGO_IMPORT_RE = re.compile(r'^\s*import\s+(?:weak\s+)?"gogoproto/gogo\.proto"\s*;[^\n]*\n', re.M)
_GOGO_OPTION_RE = re.compile(r"^\s*option\s+\(gogoproto\.[^;]*;[^\n]*\n", re.M)
_BRACKET_RE = re.compile(r"\[([^\[\]]*\(gogoproto\.[^\[\]]*)\]")


def _split_options(body: str) -> list[str]:
    """Split `a = 1, b = "x,y"` at commas outside string literals."""
    parts, cur, quote = [], [], ""
    for ch in body:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _strip_field_options(m: re.Match[str]) -> str:
    kept = [o for o in _split_options(m.group(1)) if not o.startswith("(gogoproto.")]
    return f"[{', '.join(kept)}]" if kept else ""


def rewrite_proto(text: str) -> str:
    """containerd's proto without gogoproto, importing its siblings under our package path."""
    text = _GOGO_IMPORT_RE.sub("", text)
    text = _GOGO_OPTION_RE.sub("", text)
    text = _BRACKET_RE.sub(_strip_field_options, text)
    if "gogoproto" in text:
        raise ProtoError("containerd proto uses a gogoproto construct this generator does not know")
    return text.replace(f'"{_GO_IMPORT}', f'"{PY_PREFIX}')


def _collect(root: Path, names: Iterable[str]) -> dict[str, str]:
    """Rel path -> original text, for `names` and every containerd proto they import."""
    out: dict[str, str] = {}
    todo = list(names)
    while todo:
        rel = todo.pop()
        if rel in out:
            continue
        try:
            text = (root / rel).read_text()
        except OSError as exc:
            raise ProtoError(f"cannot read containerd proto {root / rel}: {exc.strerror}") from None
        out[rel] = text
        for imp in _IMPORT_RE.findall(text):
            if imp.startswith(_GO_IMPORT):
                todo.append(imp[len(_GO_IMPORT):])
    return out


def _cache_base() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("soci-helper")) / "containerd-api"


def _key(sources: dict[str, str]) -> str:
    import google.protobuf
    import grpc_tools

    tools_version = getattr(grpc_tools, "__version__", "")
    try:
        from importlib.metadata import version

        tools_version = version("grpcio-tools")
    except Exception:  # noqa: BLE001 - any failure just means a coarser key
        pass
    h = hashlib.sha256()
    h.update(f"{_GENERATOR_REV}\0{tools_version}\0{google.protobuf.__version__}\0".encode())
    for rel in sorted(sources):
        h.update(rel.encode() + b"\0" + sources[rel].encode() + b"\0")
    return h.hexdigest()[:20]


def _generate(sources: dict[str, str], dest: Path) -> None:
    """Run protoc into a temporary sibling of `dest`, then rename it into place."""
    from importlib.resources import files

    from grpc_tools import protoc

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gen-", dir=dest.parent))
    try:
        src, out = work / "src", work / "out"
        for rel, text in sources.items():
            p = src / PY_PREFIX / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(rewrite_proto(text))
        out.mkdir()
        well_known = str(files("grpc_tools") / "_proto")
        args = ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={out}",
                f"--grpc_python_out={out}", *sorted(PY_PREFIX + rel for rel in sources)]
        if protoc.main(args) != 0:
            raise ProtoError("protoc failed to generate containerd's API stubs (see the messages above)")
        pkg = out / PY_PREFIX
        for d in [pkg, *(p for p in pkg.rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()
        os.rename(pkg, work / "final")
        try:
            os.rename(work / "final", dest)
        except OSError:
            # Another process generated the same key first; its copy is as good as ours.
            if not (dest / "services").is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_stubs() -> Path:
    """The directory holding the generated modules, generating them on first use (fast afterwards)."""
    root = find_proto_root()
    sources = _collect(root, ROOT_PROTOS)
    key = _key(sources)
    base = _cache_base()
    dest = base / key
    if (dest / "services").is_dir():
        return dest
    try:
        _generate(sources, dest)
    except PermissionError:
        # A read-only cache (e.g. another user's): generate into a private temporary one.
        dest = Path(tempfile.gettempdir()) / f"soci-helper-containerd-api-{os.getuid()}" / key
        if not (dest / "services").is_dir():
            _generate(sources, dest)
    log.debug("generated containerd API stubs in %s", dest)
    return dest
