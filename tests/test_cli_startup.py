"""What `soci` imports before it does anything: only the chosen command's machinery (start-up time is part of
every lazy pull)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soci_helper.cli import image, main, push

pytestmark = pytest.mark.timeout(60)

_PROBE = """
import json, sys
from soci_helper.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _imports(*argv: str) -> tuple[int, set[str]]:
    """Run `soci ARGV` in a fresh interpreter; its exit code and every module it imported."""
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout.splitlines()[-1])
    return doc["code"], set(doc["modules"])


_BUILD = {"soci_helper.index.build", "soci_helper.index.convert", "soci_helper.ztoc.builder",
          "soci_helper.ztoc.gzip_index", "soci_helper.ztoc.reader", "soci_helper.index.push"}


def test_help_imports_neither_grpc_nor_requests() -> None:
    code, mods = _imports("--help")
    assert code == 0
    assert not {"grpc", "requests", "urllib3", "soci_helper.oci.registry", "soci_helper.fs.server"} & mods
    assert not _BUILD & mods


def test_rpull_imports_no_index_building(tmp_path: Path) -> None:
    code, mods = _imports("--root", str(tmp_path / "root"), "-a", str(tmp_path / "none.sock"), "image", "rpull",
                          "--plain-http", "127.0.0.1:1/x:y")
    assert code != 0  # no containerd there; by then everything the pull needs is loaded
    assert {"grpc", "requests", "soci_helper.containerd.rpull"} <= mods
    assert not (_BUILD | {"soci_helper.index.ops", "soci_helper.fs.server"}) & mods
    assert not (tmp_path / "root").exists()  # rpull writes to containerd only, not to our store


def test_parser_defaults_match_the_library() -> None:
    from soci_helper.containerd.rpull import DEFAULT_SNAPSHOTTER
    from soci_helper.index.push import EXISTING_INDEX_OPTIONS, EXISTING_WARN

    assert image.DEFAULT_SNAPSHOTTER == DEFAULT_SNAPSHOTTER
    assert (push.EXISTING_INDEX_OPTIONS, push.EXISTING_WARN) == (EXISTING_INDEX_OPTIONS, EXISTING_WARN)
    args = main.build_parser().parse_args(["push", "x/y:z"])
    assert args.existing_index == EXISTING_WARN


_MOUNT_PROBE = """
import json, sys
from soci_helper.cli.mount import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_mount_helper_finding_a_local_ztoc_imports_no_registry_client(tmp_path: Path) -> None:
    # -f: everything up to starting the server (parse, open the store, look the zTOC up), which has none here.
    (tmp_path / "mnt").mkdir()
    src = "127.0.0.1:1/x@sha256:" + "a" * 64
    r = subprocess.run([sys.executable, "-c", _MOUNT_PROBE, src, str(tmp_path / "mnt"), "-f", "-o",
                        f"ro,root={tmp_path / 'root'}"], capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["code"] != 0 and "no zTOC for layer" in r.stderr
    assert "soci_helper.store.artifacts" in doc["modules"]  # the store was opened and searched
    assert not {"requests", "urllib3", "soci_helper.oci.registry"} & set(doc["modules"])
    # Nor what only writers and builders need: every mount pays for its imports before the table build starts.
    assert not {"filelock", "secrets", "soci_helper.ztoc.reader"} & set(doc["modules"])
