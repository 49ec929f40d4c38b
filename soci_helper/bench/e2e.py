"""`soci-bench e2e`: pull + run to first output, lazy SOCI start against containerd's full pull, side by side."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from .. import digest as dg
from ..fs.server import AT_REST_AFTER_SEC as REST_SEC
from ..fs.server import MODULE as SERVER_MODULE
from ..oci.layout import OCILayout
from ..oci.manifest import parse_image_manifest
from ..sandbox.containerd import SociSandbox
from ..sandbox.images import tar_of, write_image
from ..sandbox.netns import PROFILES, NetNamespace, NetProfile, registry_for
from ..sandbox.procs import pids_matching
from ..sandbox.registry import LocalRegistry
from . import suite
from . import workloads as wl

MB = 1_000_000
# The benchmark's image has a gzip layer of at least 130 MB of real files: about 450 MB of libraries and
# programs compress to that (2.9 : 1 here), and pigz makes it in ten seconds on 2 cores.
SAMPLE_BYTES = 450 * MB
MIN_SAMPLE_BYTES = 130 * MB  # of files: what the demo insists on; the benchmark wants MIN_SAMPLE_GZIP
MIN_SAMPLE_GZIP = 130 * MB
REPO, TAG = "demo/sample", "latest"
READY = "hello from a container of the soci-helper sample image"
SCRIPT = "/demo/run.sh"
COMMAND = ("/bin/sh", SCRIPT)
LAZY_MODE = "soci-v1"  # the suite's name for: soci create + push, soci image rpull, ctr run --snapshotter soci
MODES = ("full", LAZY_MODE)
MODE_LABEL = {"full": "full pull (overlayfs)", LAZY_MODE: "lazy (soci)"}
SHAPED_DEFAULT = "200mbit"
TARGET_SPEEDUP = {"loopback": 8.0}
TARGET_SPEEDUP_SHAPED = 10.0
TARGET_IDLE_RSS = 80 * MB
TARGET_SERVER_RSS = 40 * MB
# Files with other characters would need quoting in the container's script.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._/+-]+")

Progress = Callable[[str], None]


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the sample image ------------------------------------------------------------------------------


def sample_roots() -> list[str]:
    """Directories of real files present on any Debian 12 with this project's packages, most useful first."""
    stdlib = sysconfig.get_paths()["stdlib"].lstrip("/")
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return [stdlib, "usr/lib/gcc", f"usr/lib/{multiarch}", "usr/share/perl", "usr/bin", "usr/libexec", "usr/share"]


@dataclass
class SampleImage:
    layout: Path
    roots: list[str]  # the directories the big layer's files came from
    files: int
    file_bytes: int
    big_blob: int  # gzip-compressed size of the big layer
    small_blob: int
    probes: list[str]  # absolute paths of the two files the container hashes
    expected: list[str] = field(default_factory=list)  # the container's stdout lines

    def describe(self) -> str:
        return (f"one gzip layer of {self.files} real files, {self.file_bytes / MB:.1f} MB "
                f"({self.big_blob / MB:.1f} MB gzip) from /{', /'.join(self.roots)}; "
                f"one {self.small_blob / MB:.1f} MB layer with busybox and {SCRIPT}")


def _collect(roots: list[str], target: int) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Tar entries (relative to /, parents first), regular files with sizes, and the roots used; up to `target`."""
    entries: list[str] = []
    regular: list[tuple[str, int]] = []
    used: list[str] = []
    seen: set[str] = set()
    total = 0

    def add_dir(rel: str) -> None:
        if rel not in seen:
            seen.add(rel)
            entries.append(rel)

    for root in roots:
        top = Path("/", root)
        if not top.is_dir() or top.is_symlink():
            continue
        used.append(root)
        for parent in reversed(Path(root).parents[:-1]):
            add_dir(str(parent))
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, "/")
            add_dir(rel_dir)
            # Symlinks to directories are listed as directories but never walked: keep them as links.
            for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                dirnames.remove(d)
                entries.append(f"{rel_dir}/{d}")
            for name in sorted(filenames):
                rel = f"{rel_dir}/{name}"
                try:
                    st = os.lstat("/" + rel)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    entries.append(rel)
                    regular.append((rel, st.st_size))
                    total += st.st_size
                elif stat.S_ISLNK(st.st_mode):
                    entries.append(rel)
                if total >= target:
                    return entries, regular, used
    return entries, regular, used


def _pick_probes(regular: list[tuple[str, int]]) -> list[str]:
    """Two small files a third and two thirds into the layer: they sit in different spans."""
    small = [rel for rel, size in regular if 1024 <= size <= 64 * 1024 and _PLAIN_PATH.fullmatch(rel)]
    if len(small) < 2:
        raise RuntimeError("the sample files hold fewer than two small files to read")
    return ["/" + small[len(small) // 3], "/" + small[2 * len(small) // 3]]


def build_sample_image(work: Path, say: Progress = progress) -> SampleImage:
    """An OCI layout in `work`: a big gzip layer of real files from the machine, then busybox and a script."""
    bb = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.isfile(p)), None)
    if bb is None:
        raise RuntimeError("busybox-static is not installed")
    work.mkdir(parents=True, exist_ok=True)
    entries, regular, used = _collect(sample_roots(), SAMPLE_BYTES)
    file_bytes = sum(size for _, size in regular)
    if file_bytes < MIN_SAMPLE_BYTES:
        raise RuntimeError(f"only {file_bytes / MB:.0f} MB of files in /{', /'.join(sample_roots())}; "
                           f"the sample layer needs {MIN_SAMPLE_BYTES / MB:.0f} MB")
    probes = _pick_probes(regular)
    say(f"  collected {len(regular)} files, {file_bytes / MB:.1f} MB, from /{', /'.join(used)}")

    listing = work / "big.list"
    listing.write_bytes(b"".join(e.encode() + b"\0" for e in entries))
    big = work / "big.tar"
    subprocess.run(["tar", "--numeric-owner", "--no-recursion", "--null", "-C", "/", "-T", str(listing),
                    "-cf", str(big)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listing.unlink()

    small_root = work / "small"
    (small_root / "bin").mkdir(parents=True)
    shutil.copy(bb, small_root / "bin" / "busybox")
    for applet in ("sh", "echo", "sha256sum"):
        os.symlink("busybox", small_root / "bin" / applet)
    (small_root / "demo").mkdir()
    script = small_root / "demo" / "run.sh"
    script.write_text(f"#!/bin/sh\necho '{READY}'\nexec sha256sum {' '.join(probes)}\n")
    script.chmod(0o755)
    small = tar_of(work / "small.tar", str(small_root), ["bin", "demo"])
    shutil.rmtree(small_root)

    compressor = "pigz" if shutil.which("pigz") else "gzip"
    say(f"  compressing the {big.stat().st_size / MB:.0f} MB tar with {compressor}")
    layout = work / "layout"
    desc = write_image(layout, [(big, compressor), (small, "gzip")], TAG)
    manifest = parse_image_manifest(OCILayout(layout).read_blob(desc.digest))
    big.unlink()
    small.unlink()
    expected = [READY] + [f"{dg.hex_part(dg.of_file(p))}  {p}" for p in probes]
    return SampleImage(layout, used, len(regular), file_bytes, manifest.layers[0].size, manifest.layers[1].size,
                       probes, expected)


def publish(reg: LocalRegistry, image: SampleImage, build_root: Path) -> tuple[str, list[str]]:
    """Push the image, build its SOCI index and push that too; (reference, `layer -> ztoc` lines of soci create)."""
    ref = reg.push_oci_layout(image.layout, f"{REPO}:{TAG}", tag=TAG)
    created = suite.run_soci("create", "--plain-http", ref, root=build_root).stdout
    ztocs = [line for line in created.splitlines() if "-> ztoc" in line]
    if not ztocs:
        raise RuntimeError(f"soci create made no zTOC for the sample image: {created.strip()}")
    suite.run_soci("push", "--plain-http", ref, root=build_root)
    return ref, ztocs


def workload() -> wl.Workload:
    return wl.Workload("sample", "sample", COMMAND, ready=READY, about="echo, then sha256sum of two files")


def check_output(image: SampleImage, output: str) -> str | None:
    """Why the container's stdout is wrong, or None."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    if lines != image.expected:
        return f"expected {image.expected!r}, got {lines!r}"
    return None


def layer_servers(root: Path) -> list[int]:
    """Pids of the layer servers started for the snapshotter root `root` (their argv names it)."""
    return pids_matching(SERVER_MODULE, str(root))


def idle_daemon_rss(state_parent: Path, settle: float = 1.0) -> int:
    """RSS of a freshly started snapshotter daemon that serves containerd but holds no layers."""
    with suite.fresh_state(state_parent) as d:
        # An explicit empty config: the machine's own config file must not change what is measured.
        cfg = d / "config.toml"
        cfg.write_text("")
        sb = SociSandbox(workdir=d / "sb", config=cfg)
        sb.snapshotter.log_level = "info"
        sb.start()
        try:
            time.sleep(settle)
            assert sb.snapshotter.proc is not None
            rss = suite.process_rss(sb.snapshotter.proc.pid)
            if rss is None:
                raise RuntimeError("the snapshotter daemon exited while idle")
            return rss
        finally:
            sb.stop()


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, v: float | None) -> None:
        if v is not None:
            self.values.append(v)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        if not self.values:
            return "-"
        med = f"{self.median / scale:.{digits}f}"  # type: ignore[operator]
        if len(self.values) == 1:
            return med
        return f"{med} ({min(self.values) / scale:.{digits}f}-{max(self.values) / scale:.{digits}f})"


@dataclass
class Results:
    image: SampleImage
    runs: int
    cells: dict[tuple[str, str], suite.Cell] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)  # net -> how it was shaped
    idle_rss: Series = field(default_factory=Series)
    server_rss: Series = field(default_factory=Series)
    server_rss_rest: Series = field(default_factory=Series)
    servers_per_run: Series = field(default_factory=Series)
    errors: list[str] = field(default_factory=list)


def measure_net(reg: LocalRegistry, net: NetProfile, image: SampleImage, res: Results, state_parent: Path,
                counter: list[int], total: int) -> None:
    refs = suite.Refs(full=f"{reg.host}/{REPO}:{TAG}", v1=f"{reg.host}/{REPO}:{TAG}", v2="")
    w = workload()
    for i in range(res.runs):
        # Interleaved, so that drift on a shared machine hits both modes alike.
        for mode in MODES:
            counter[0] += 1
            cell = res.cells.setdefault((net.name, mode), suite.Cell(net.name, w.name, mode))
            head = f"[{counter[0]}/{total}] {net.name} {MODE_LABEL[mode]} run {i + 1}/{res.runs}"
            rss: list[int] = []
            rest: list[int] = []
            bad: list[str] = []

            def inspect(sb: SociSandbox, output: str, mode: str = mode, rss: list[int] = rss, rest: list[int] = rest,
                        bad: list[str] = bad) -> None:
                if (why := check_output(image, output)) is not None:
                    bad.append(why)
                if mode == LAZY_MODE:
                    pids = layer_servers(sb.snapshotter.root)
                    rss.extend(r for pid in pids if (r := suite.process_rss(pid)) is not None)
                    # Again once the servers have been quiet for two stats periods (they let go of spans).
                    time.sleep(REST_SEC)
                    rest.extend(r for pid in pids if (r := suite.process_rss(pid)) is not None)

            try:
                r = suite.measure(reg, w, mode, refs, state_parent, inspect=inspect)
                if bad:
                    raise RuntimeError(f"wrong container output: {bad[0]}")
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                cell.errors.append(str(e))
                res.errors.append(f"{head}: {e}")
                progress(f"{head}: FAILED {str(e)[:300]}")
                continue
            cell.runs.append(r)
            extra = ""
            if mode == LAZY_MODE:
                res.servers_per_run.add(len(rss))
                for v in rss:
                    res.server_rss.add(v)
                for v in rest:
                    res.server_rss_rest.add(v)
                extra = f", {len(rss)} layer server(s) at {', '.join(f'{v / MB:.0f}' for v in rss)} MB RSS"
            progress(f"{head}: pull {r.pull_s:.2f} s + first output {r.ready_s:.2f} s = {r.total_s:.2f} s, "
                     f"{r.bytes_ready / MB:.1f} MB{extra}")


def _speedup(full: suite.Cell | None, lazy: suite.Cell | None) -> float | None:
    if not full or not lazy:
        return None
    f, z = full.median("total_s"), lazy.median("total_s")
    return f / z if f and z else None


def _paired(full: suite.Cell | None, lazy: suite.Cell | None) -> list[float]:
    """Full/lazy per interleaved pair (run i of each): the spread of the speed-up."""
    if not full or not lazy:
        return []
    return [f.total_s / z.total_s for f, z in zip(full.runs, lazy.runs, strict=False) if z.total_s > 0]


def _target(net: NetProfile) -> float:
    return TARGET_SPEEDUP.get(net.name, TARGET_SPEEDUP_SHAPED if net.shaped else 8.0)


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def link_text(net: NetProfile, method: str) -> str:
    if not net.shaped:
        return "registry on loopback, no shaping"
    if method == "tbf+relay":
        return (f"registry in its own network namespace behind a veth pair: tbf {net.rate} on both ends and a relay "
                f"delaying each direction {net.delay_ms:g} ms (**fallback: this kernel has no netem**)")
    return f"registry in its own network namespace behind a veth pair: netem {net.rate}, {net.delay_ms:g} ms each way"


def markdown(res: Results, nets: list[NetProfile]) -> str:
    img = res.image
    lines = [
        "### soci-bench e2e: pull + run to first output, lazy SOCI start against a full pull",
        "",
        f"Image: {img.describe()}. Command: `{' '.join(COMMAND)}` (echo, then sha256sum of two files of the big "
        f"layer; the output is checked). Median (min-max) of {res.runs} interleaved run(s) per mode, each from a "
        "clean state (new containerd and snapshotter on a new tmpfs). full = `ctr images pull` + `ctr run` with "
        "containerd's overlayfs snapshotter; lazy = `soci image rpull` + `ctr run --snapshotter soci` (default "
        "settings, background fetch on). MB = bytes the registry sent (its access log) until the first output.",
        "",
        "| link | mode | pull s | run to first output s | pull + run s | MB from registry "
        "| lazy vs full | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for net in nets:
        full, lazy = res.cells.get((net.name, "full")), res.cells.get((net.name, LAZY_MODE))
        for mode, cell in (("full", full), (LAZY_MODE, lazy)):
            if cell is None:
                continue
            if not cell.runs:
                err = (cell.errors[0] if cell.errors else "no runs")[:150].replace("|", "/")
                lines.append(f"| {net.name} | {MODE_LABEL[mode]} | error: {err} | | | | | | |")
                continue
            ser = {a: Series([getattr(r, a) for r in cell.runs]) for a in ("pull_s", "ready_s", "total_s")}
            mb = Series([float(r.bytes_ready) for r in cell.runs])
            ratio = target = met = ""
            if mode == LAZY_MODE:
                sp = _speedup(full, lazy)
                pairs = _paired(full, lazy)
                fb, lb = (full.median("bytes_ready") if full else None), lazy.median("bytes_ready") if lazy else None
                if sp is not None:
                    ratio = f"{sp:.1f}x faster"
                    if len(pairs) > 1:
                        ratio += f" ({min(pairs):.1f}-{max(pairs):.1f})"
                    if fb and lb is not None:
                        ratio += f", {lb / fb:.3f}x the bytes"
                target = f">= {_target(net):g}x faster"
                met = _yes(None if sp is None else sp >= _target(net))
            failed = f" ({len(cell.errors)} failed)" if cell.errors else ""
            lines.append(f"| {net.name} | {MODE_LABEL[mode]}{failed} | {ser['pull_s'].fmt()} | "
                         f"{ser['ready_s'].fmt()} | {ser['total_s'].fmt()} | {mb.fmt(MB, 1)} | {ratio} | "
                         f"{target} | {met} |")
    lines += ["", "Links:"]
    lines += [f"- {net.name}: {link_text(net, res.methods.get(net.name, 'none'))}" for net in nets]
    lines += [
        "",
        "| memory | median (min-max) MB | target | met |",
        "|---|---|---|---|",
        f"| idle daemon RSS (started, serving containerd, no layers), {len(res.idle_rss.values)} start(s) | "
        f"{res.idle_rss.fmt(MB, 1)} | <= {TARGET_IDLE_RSS / MB:g} MB | "
        f"{_yes(None if res.idle_rss.median is None else res.idle_rss.median <= TARGET_IDLE_RSS)} |",
        f"| RSS per lazy layer server after the run, {len(res.server_rss.values)} server(s) | "
        f"{res.server_rss.fmt(MB, 1)} | <= {TARGET_SERVER_RSS / MB:g} MB | "
        f"{_yes(None if res.server_rss.median is None else res.server_rss.median <= TARGET_SERVER_RSS)} |",
        f"| ... the same servers {REST_SEC:g} s later, at rest | {res.server_rss_rest.fmt(MB, 1)} | "
        f"<= {TARGET_SERVER_RSS / MB:g} MB | "
        f"{_yes(None if res.server_rss_rest.median is None else res.server_rss_rest.median <= TARGET_SERVER_RSS)} |",
    ]
    peaks = Series([float(r.rss_peak) for (_, m), c in res.cells.items() if m == LAZY_MODE
                    for r in c.runs if r.rss_peak])
    lines.append(f"| peak RSS of daemon + mount helper + layer servers during a lazy start | {peaks.fmt(MB, 1)} "
                 "| - | - |")
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------------


def _nets(values: list[str] | None) -> list[NetProfile]:
    names: list[str] = []
    for v in values or ["all"]:
        for x in v.split(","):
            if x == "all":
                names += ["loopback", SHAPED_DEFAULT]
            elif x in PROFILES:
                names.append(x)
            elif x:
                raise SystemExit(f"soci-bench e2e: unknown network {x} (known: all, {', '.join(PROFILES)})")
    return [PROFILES[n] for n in dict.fromkeys(names)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soci-bench e2e", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="interleaved cold starts per mode and link (default 5)")
    p.add_argument("--net", action="append",
                   help=f"loopback, {SHAPED_DEFAULT} or all (both; the default); comma-separated profiles "
                        f"({', '.join(PROFILES)}) also work")
    p.add_argument("--state-dir", default="/tmp",
                   help="where the work directory and each run's tmpfs go (default /tmp; short: socket paths)")
    return p


def run(args: argparse.Namespace) -> int:
    nets = _nets(args.net)
    work = Path(tempfile.mkdtemp(prefix="soci-e2e-", dir=args.state_dir))
    started = time.monotonic()
    try:
        progress("== sample image")
        image = build_sample_image(work / "image")
        if image.big_blob < MIN_SAMPLE_GZIP:
            print(f"soci-bench e2e: error: the sample layer is {image.big_blob / MB:.0f} MB gzip, the benchmark "
                  f"needs {MIN_SAMPLE_GZIP / MB:.0f} MB: too few files under /{', /'.join(sample_roots())}",
                  file=sys.stderr)
            return 1
        res = Results(image, args.runs)
        regdir = work / "registry"
        progress("== registry: push, soci create, soci push")
        with LocalRegistry(workdir=regdir) as reg:
            _, ztocs = publish(reg, image, work / "soci-build")
        for line in ztocs:
            progress(f"  {line}")
        shutil.rmtree(image.layout, ignore_errors=True)
        progress(f"== idle daemon RSS ({min(args.runs, 3)} starts)")
        for _ in range(min(args.runs, 3)):
            res.idle_rss.add(idle_daemon_rss(work))
        total = len(nets) * args.runs * len(MODES)
        counter = [0]
        for net in nets:
            ns_ctx = NetNamespace(tag="e2e") if net.shaped else nullcontext(None)
            with ns_ctx as ns:
                # The same registry storage, served on loopback or from inside the namespace.
                reg = registry_for(net, ns, regdir)
                with reg:
                    res.methods[net.name] = ns.method if ns is not None else "none"
                    progress(f"== {net.name}: {link_text(net, res.methods[net.name])}, registry {reg.host}")
                    measure_net(reg, net, image, res, work, counter, total)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(res, nets), end="", flush=True)
    progress(f"== done in {time.monotonic() - started:.0f} s")
    if any(not c.runs for c in res.cells.values()):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if os.geteuid() != 0:
        print("soci-bench e2e: needs root (containerd, mounts, network namespaces)", file=sys.stderr)
        return 2
    if args.runs < 1:
        raise SystemExit("soci-bench e2e: --runs must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
