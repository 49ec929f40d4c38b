"""`soci-bench registry` on a small blob: every row is measured, the verified download's digest included."""

from __future__ import annotations

import re
import shutil

import pytest

from soci_helper.bench import registry_bench

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("docker-registry", "curl", "openssl")),
                       reason="docker-registry, curl or openssl missing"),
]


def test_registry_bench_measures_client_curl_and_verified_curl() -> None:
    rows = registry_bench.run(["--size-mb", "8", "--ranges", "4", "--runs", "1"])
    assert [r["test"].split(",")[0].split(" (")[0] for r in rows] == [
        "whole blob 8 MiB", "whole blob 8 MiB", "4 x 4 MiB ranges"]
    assert "openssl dgst -sha256" in rows[1]["test"]
    for row in rows:
        for col in ("client", "curl"):
            m = re.match(r"([0-9.]+) (s|ms)", row[col])
            assert m and float(m.group(1)) > 0, row
        ratio = row.get("client speed / curl") or row.get("client time / curl")
        assert ratio and float(ratio.rstrip("x")) > 0, row
