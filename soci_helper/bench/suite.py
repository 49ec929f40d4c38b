"""`soci-bench suite`: lazy start against full pull on realistic workloads, on loopback and a shaped link."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..index.ops import Store
from ..sandbox.containerd import SociSandbox, unmount_all_under
from ..sandbox.netns import PROFILES, NetNamespace, NetProfile, registry_for
from ..sandbox.registry import LocalRegistry
from ..ztoc.model import DEFAULT_SPAN_SIZE
from ..ztoc.reader import parse_zinfo
from . import workloads as wl

MODES: dict[str, str] = {
    "full": "containerd overlayfs snapshotter: ctr images pull, then ctr run",
    "soci-v1": "soci create + push; soci image rpull, then ctr run --snapshotter soci",
    "soci-v2": "soci convert to another tag; rpull + run of that tag",
    "soci-v1-nobg": "soci-v1 with [background_fetch] disable = true",
    "soci-v2-prefetch": "soci convert with a load order recorded from one unmeasured soci-v1 start "
                        "(soci mounts reads -> --prefetch-files-json), to a tag of its own",
    "stargz": "stargz-snapshotter (containerd-stargz-grpc + ctr-remote)",
}
LAZY = ("soci-v1", "soci-v2", "soci-v1-nobg", "soci-v2-prefetch")
DEFAULT_MODES = ("full", "soci-v1", "soci-v2", "soci-v1-nobg", "soci-v2-prefetch", "stargz")
DEFAULT_WORKLOADS = ("busybox", "model-headers", "python-scipy")
RUN_TIMEOUT = 1800.0
TMPFS_SIZE = "12g"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lazy_support() -> str | None:
    """Why the lazy modes cannot run here, or None when `soci image rpull` and the snapshotter's decider exist."""
    for mod, what in (("soci_helper.containerd.rpull", "soci image rpull"),
                      ("soci_helper.snapshotter.soci", "the snapshotter's lazy-layer decider")):
        if importlib.util.find_spec(mod) is None:
            return f"{what} ({mod}) is not available yet"
    return None


def stargz_support() -> str | None:
    missing = [t for t in ("containerd-stargz-grpc", "ctr-remote") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    return "stargz-snapshotter is installed, but this suite does not drive it yet"


# --- measuring ---------------------------------------------------------------------


@dataclass
class Run:
    pull_s: float
    ready_s: float
    total_s: float
    bytes_pull: int
    bytes_ready: int
    rss_peak: int | None  # bytes, snapshotter processes together; None for full pull


class RssSampler(threading.Thread):
    """Peak of the summed RSS of processes whose argv names `needles` (daemon, mount helpers, layer servers)."""

    def __init__(self, needles: list[str], exclude: tuple[str, ...] = ("rpull",), interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.needles = [n.encode() for n in needles]
        self.exclude = [e.encode() for e in exclude]
        self.interval = interval
        self.peak = 0
        self._stop_ev = threading.Event()
        self._match: dict[str, bool] = {}

    def _matches(self, pid: str) -> bool:
        m = self._match.get(pid)
        if m is None:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
            if not argv:
                return False  # a zombie or a kernel thread: decide later
            m = any(n in argv for n in self.needles) and not any(e in argv for e in self.exclude)
            self._match[pid] = m
        return m

    def sample(self) -> None:
        total = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit() and self._matches(pid):
                total += process_rss(int(pid)) or 0
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.sample()
            self._stop_ev.wait(self.interval)

    def stop(self) -> int:
        self._stop_ev.set()
        self.join(timeout=5)
        self.sample()
        return self.peak


def process_rss(pid: int) -> int | None:
    """Resident set size of `pid` in bytes; None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def fresh_state(parent: Path) -> Iterator[Path]:
    """A new tmpfs for containerd and snapshotter state: nothing cached, and no ext4 slowing down with reuse."""
    d = Path(tempfile.mkdtemp(prefix="sbr-", dir=parent))
    try:
        # Inside the try: a signal that lands while mounting must still unmount.
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(d)],
                       check=True, capture_output=True, timeout=30)
        yield d
    finally:
        unmount_all_under(d)
        if subprocess.run(["umount", str(d)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def _daemon_config(path: Path, registry_host: str, background_fetch: bool, record_reads: bool = False) -> Path:
    lines = ["[background_fetch]", f"disable = {'false' if background_fetch else 'true'}", ""]
    if record_reads:
        lines += ["[fuse]", "record_reads = true", ""]
    if not registry_host.startswith("127."):
        # The decider talks plain HTTP to loopback only; elsewhere it needs an insecure mirror, as upstream.
        lines += [f'[resolver.host."{registry_host}"]',
                  f'mirrors = [{{ host = "{registry_host}", insecure = true }}]', ""]
    path.write_text("\n".join(lines))
    return path


def run_soci(*args: str, root: Path, extra: tuple[str, ...] = (), timeout: float = RUN_TIMEOUT,
             entry: tuple[str, ...] = ("-m", "soci_helper.cli.main")) -> subprocess.CompletedProcess[str]:
    """`soci --root ROOT EXTRA... ARGS...` with this interpreter; raises RuntimeError with its stderr on failure."""
    cmd = [sys.executable, *entry, "--root", str(root), *extra, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"soci {' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    return r


def _wait_ready(cmd: list[str], ready: str, timeout: float) -> tuple[float, str]:
    """Start `cmd`; seconds until a stdout line contains `ready`. Waits for the exit too (not timed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[float] = []
    out: list[str] = []

    def reader() -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            out.append(line)
            if not seen and ready in line:
                seen.append(time.perf_counter() - t0)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)
        raise RuntimeError(f"{' '.join(cmd[5:8])}: not ready within {timeout:.0f}s") from None
    th.join(timeout=10)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if not seen:
        raise RuntimeError(f"no {ready!r} line (exit {p.returncode}): {''.join(out)[-500:]} {err.strip()[-800:]}")
    return seen[0], "".join(out)


def _cli_has_rpull() -> bool:
    from ..cli.main import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "image" in action.choices
    return False


def _rpull_cmd() -> tuple[str, ...]:
    """How to call `soci ... image rpull`: the soci CLI, or this module while the CLI does not wire it yet."""
    if _cli_has_rpull():
        return ("-m", "soci_helper.cli.main")
    return ("-m", "soci_helper.bench.suite", "_rpull")


def _rpull_main(argv: list[str]) -> int:
    """`soci --root R -a A -n N image rpull ...` with only the `image` command (see _rpull_cmd)."""
    from ..cli import image as cli_image
    from ..cli.common import run_main

    p = argparse.ArgumentParser(prog="soci")
    p.add_argument("--root")
    p.add_argument("-a", "--address", default="/run/containerd/containerd.sock")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--config")
    sub = p.add_subparsers(dest="command", required=True)
    cli_image.add_image_parser(sub)
    args = p.parse_args(argv)
    return run_main("soci", lambda: int(args.func(args)))


@dataclass
class Refs:
    full: str
    v1: str
    v2: str
    prefetch: str = ""


def measure(reg: LocalRegistry, w: wl.Workload, mode: str, refs: Refs, state_parent: Path,
            inspect: Callable[[SociSandbox, str], None] | None = None, record_reads: bool = False) -> Run:
    """One cold start: fresh tmpfs state, fresh access-log window, pull then run until the ready line.

    `inspect(sandbox, container stdout)` runs after the container exited, before anything is torn down.
    record_reads: the layer servers record what is read (see record_load_order).
    """
    lazy = mode in LAZY
    ref = {"soci-v2": refs.v2, "soci-v2-prefetch": refs.prefetch}.get(mode) or refs.full
    with fresh_state(state_parent) as d:
        cfg = _daemon_config(d / "config.toml", reg.host, background_fetch=mode != "soci-v1-nobg",
                             record_reads=record_reads)
        sb = SociSandbox(workdir=d / "sb", config=cfg)
        # Debug logging would be measured too.
        sb.snapshotter.log_level = "info"
        sb.start()
        sampler: RssSampler | None = None
        try:
            c = sb.containerd
            if lazy:
                sampler = RssSampler([str(sb.snapshotter.root), str(sb.snapshotter.address)])
                sampler.start()
            mark0 = len(reg.access_log())
            t0 = time.perf_counter()
            if lazy:
                run_soci("image", "rpull", "--plain-http", ref, root=sb.snapshotter.root,
                         extra=("-a", str(c.address), "-n", c.namespace), entry=_rpull_cmd())
            else:
                c.ctr("images", "pull", "--plain-http", ref, timeout=RUN_TIMEOUT)
            pull_s = time.perf_counter() - t0
            mark1 = len(reg.access_log())
            run = ["ctr", "-a", str(c.address), "-n", c.namespace, "run", "--rm"]
            if lazy:
                run += ["--snapshotter", "soci"]
            run += [ref, f"bench-{uuid.uuid4().hex[:8]}", *w.command]
            ready_s, output = _wait_ready(run, w.ready, RUN_TIMEOUT)
            log = reg.access_log()
            mark2 = len(log)
            bytes_pull = sum(e.size for e in log[mark0:mark1])
            bytes_ready = sum(e.size for e in log[mark0:mark2])
            rss = sampler.stop() if sampler else None
            sampler = None
            if inspect is not None:
                inspect(sb, output)
            return Run(round(pull_s, 3), round(ready_s, 3), round(pull_s + ready_s, 3), bytes_pull, bytes_ready, rss)
        finally:
            if sampler is not None:
                sampler.stop()
            sb.stop()


# --- setup: images into the registry, SOCI indexes built and pushed -------------------------


def _repo(w: wl.Workload) -> str:
    return f"bench/{w.name}"


def fmt_size(n: int) -> str:
    """4194304 -> "4 MiB", 524288 -> "512 KiB", other sizes in bytes."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    """Bytes from "524288", "512K", "512KiB", "1M" or "1MiB" (binary units); for argparse."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:([KkMm])(?:i?B)?)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or a number with K or M)")
    n = int(m.group(1)) << {None: 0, "k": 10, "m": 20}[m.group(2) and m.group(2).lower()]
    if n <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return n


@dataclass
class IndexInfo:
    """What a run's SOCI v1 index is made of: what rpull fetches before the first lazy read, and the span grid."""

    digest: str
    index_bytes: int
    span_size: int
    # One entry per zTOC: layer digest, zTOC digest and bytes, spans in the layer, compressed layer bytes.
    ztocs: list[dict[str, Any]]
    head_span: int = 0

    @property
    def ztoc_bytes(self) -> int:
        return sum(int(z["ztoc_bytes"]) for z in self.ztocs)


_CREATED_RE = re.compile(r"^soci index (sha256:[0-9a-f]{64}) for ", re.M)


def _layout(span_size: int, head_span: int) -> str:
    return fmt_size(span_size) + (f", {fmt_size(head_span)} heads of big files" if head_span else "")


def index_info(build_root: Path, create_stdout: str, span_size: int) -> IndexInfo:
    """The index `soci create` just built, checked against `span_size`.

    The check is the guard against measuring the wrong thing: a zTOC reused from an earlier build with
    another span size would otherwise go unnoticed, as every other number would still look plausible.
    """
    m = _CREATED_RE.search(create_stdout)
    if m is None:
        raise RuntimeError(f"soci create printed no index digest: {create_stdout.strip()[-500:]}")
    store = Store.open(str(build_root))
    try:
        digest = m.group(1)
        idx = store.load_index(digest)
        ztocs: list[dict[str, Any]] = []
        for ref in idx.ztocs:
            z = store.load_ztoc(ref.digest)
            # The span size inside the zTOC is what the layer server uses; the annotation only describes it.
            inner = parse_zinfo(z).span_size
            if ref.span_size != span_size or inner != span_size:
                raise RuntimeError(f"zTOC {ref.digest} of layer {ref.layer_digest} has span size {inner} "
                                   f"(annotation {ref.span_size}), not the {span_size} asked for")
            ztocs.append({"layer": ref.layer_digest, "ztoc": ref.digest, "ztoc_bytes": ref.size,
                          "spans": z.max_span_id + 1, "layer_bytes": z.compressed_archive_size})
        return IndexInfo(digest, store.content.size(digest), span_size, ztocs)
    finally:
        store.close()


def refs_for(reg: LocalRegistry, w: wl.Workload) -> Refs:
    base = f"{reg.host}/{_repo(w)}"
    return Refs(full=f"{base}:latest", v1=f"{base}:latest", v2=f"{base}:soci-v2", prefetch=f"{base}:soci-prefetch")


def record_load_order(reg: LocalRegistry, w: wl.Workload, dst: Path, state_parent: Path) -> int:
    """One unmeasured soci-v1 start with the layer servers recording their reads; the load-order document
    (`soci mounts reads`) goes to `dst`. Returns how many segments it lists: none for an image without
    lazy layers (busybox), whose prefetch tag is then a plain v2 conversion."""
    from ..fs import server as srv
    from ..fs.record import load_order

    items: list[dict[str, Any]] = []

    def collect(sb: SociSandbox, _out: str) -> None:
        time.sleep(srv.STATS_PERIOD_SEC + 0.5)  # each server writes its record once a period
        items.extend(load_order(sorted(srv.mounts_dir(sb.snapshotter.root).glob("*.reads"))))

    measure(reg, w, "soci-v1", refs_for(reg, w), state_parent, inspect=collect, record_reads=True)
    dst.write_text(json.dumps(items))
    return len(items)


def prepare_registry(regdir: Path, images: list[wl.BuiltImage], modes: list[str], min_layer_size: int,
                     work: Path, span_size: int = DEFAULT_SPAN_SIZE, head_span: int = 0,
                     state_parent: Path | None = None) -> dict[str, IndexInfo]:
    """Push every image, then build and push its v1 index and convert it to a v2 tag (unmeasured, loopback).

    Returns the v1 index of each workload that got one. Indexes cannot leak between runs: `work` (the
    build store) and `regdir` are new for every run, and a run has one span size.
    """
    build_root = work / "soci-build"
    build = ("--plain-http", "--min-layer-size", str(min_layer_size), "--span-size", str(span_size),
             "--head-span", str(head_span))
    infos: dict[str, IndexInfo] = {}
    with LocalRegistry(workdir=regdir) as reg:
        for img in images:
            w = img.workload
            t0 = time.monotonic()
            ref = reg.push_oci_layout(img.layout, f"{_repo(w)}:latest")
            note = f"pushed in {time.monotonic() - t0:.0f} s"
            if {"soci-v1", "soci-v1-nobg", "soci-v2-prefetch"} & set(modes):
                created = run_soci("create", *build, ref, root=build_root)
                info = index_info(build_root, created.stdout, span_size)
                info.head_span = head_span
                infos[w.name] = info
                run_soci("push", "--plain-http", ref, root=build_root)
                note += (f", v1 index pushed ({len(info.ztocs)} zTOC(s), {info.ztoc_bytes / 1e6:.1f} MB, "
                         f"spans of {_layout(span_size, head_span)})")
            if "soci-v2" in modes:
                run_soci("convert", *build, ref, refs_for(reg, w).v2, root=build_root)
                note += ", v2 converted"
            if "soci-v2-prefetch" in modes:
                order = work / f"{w.name}-load-order.json"
                n = record_load_order(reg, w, order, state_parent or work)
                run_soci("convert", *build, "--prefetch-files-json", str(order), ref, refs_for(reg, w).prefetch,
                         root=build_root)
                note += f", load order of {n} segments recorded and converted with it"
            _progress(f"  {w.name}: {note} ({time.monotonic() - t0:.0f} s)")
    return infos


# --- results -------------------------------------------------------------------------


@dataclass
class Cell:
    net: str
    workload: str
    mode: str
    runs: list[Run] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        vals = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return statistics.median(vals) if vals else None

    def spread(self, attr: str) -> tuple[float, float] | None:
        vals = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return (min(vals), max(vals)) if vals else None


def _summary(cell: Cell, full: Cell | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("pull_s", "ready_s", "total_s", "bytes_pull", "bytes_ready", "rss_peak"):
        med, sp = cell.median(attr), cell.spread(attr)
        out[attr] = {"median": med, "min": sp[0] if sp else None, "max": sp[1] if sp else None}
    for attr in ("total_s", "bytes_ready"):
        a, b = cell.median(attr), full.median(attr) if full else None
        out[f"{attr}_vs_full"] = round(a / b, 4) if a is not None and b else None
    return out


def _fmt_s(cell: Cell, attr: str) -> str:
    med, sp = cell.median(attr), cell.spread(attr)
    if med is None or sp is None:
        return "-"
    if len(cell.runs) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({sp[0]:.2f}-{sp[1]:.2f})"


def _fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def markdown(cells: dict[tuple[str, str, str], Cell], nets: list[NetProfile], workloads: list[str],
             modes: list[str], skipped: dict[str, str], runs: int, methods: dict[str, str] | None = None,
             span_size: int = DEFAULT_SPAN_SIZE, indexes: dict[str, IndexInfo] | None = None,
             head_span: int = 0) -> str:
    lines: list[str] = []
    lazy_ran = any(c.mode in LAZY and c.runs for c in cells.values())
    spans = f"; SOCI spans of {_layout(span_size, head_span)}" if lazy_ran else ""
    for net in nets:
        desc = net.describe((methods or {}).get(net.name))
        lines += [f"#### {net.name}: {desc}; median (min-max) of {runs} run(s){spans}", "",
                  "| workload | mode | pull s | run to ready s | total s | total vs full | MB during pull "
                  "| MB until ready | MB vs full | snapshotter peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for wname in workloads:
            full = cells.get((net.name, wname, "full"))
            for mode in modes:
                cell = cells.get((net.name, wname, mode))
                if cell is None:
                    continue
                if not cell.runs:
                    err = cell.errors[0] if cell.errors else "no runs"
                    lines.append(f"| {wname} | {mode} | error: {err[:120].replace('|', '/')} |||||||| ")
                    continue
                s = _summary(cell, full)
                ratio_t = s["total_s_vs_full"]
                ratio_b = s["bytes_ready_vs_full"]
                rss = cell.median("rss_peak")
                lines.append(
                    f"| {wname} | {mode} | {_fmt_s(cell, 'pull_s')} | {_fmt_s(cell, 'ready_s')} | "
                    f"{_fmt_s(cell, 'total_s')} | {'-' if ratio_t is None else f'{ratio_t:.2f}x'} | "
                    f"{_fmt_mb(cell.median('bytes_pull'))} | {_fmt_mb(cell.median('bytes_ready'))} | "
                    f"{'-' if ratio_b is None else f'{ratio_b:.3f}x'} | {_fmt_mb(rss)} |"
                    + (f" ({len(cell.errors)} failed)" if cell.errors else ""))
        lines.append("")
    if indexes:
        lines.append(f"SOCI v1 indexes (`soci create --span-size {span_size} --head-span {head_span}`):")
        for wname in workloads:
            info = indexes.get(wname)
            if info is None:
                continue
            per_layer = "; ".join(f"layer {z['layer'][7:19]} {z['layer_bytes'] / 1e6:.1f} MB in {z['spans']} spans, "
                                  f"zTOC {z['ztoc_bytes'] / 1e6:.2f} MB" for z in info.ztocs)
            lines.append(f"- {wname}: index {info.index_bytes} B + {len(info.ztocs)} zTOC(s) "
                         f"{info.ztoc_bytes / 1e6:.2f} MB" + (f" ({per_layer})" if per_layer else ""))
        lines.append("")
    for mode, why in skipped.items():
        lines.append(f"- {mode} skipped: {why}")
    return "\n".join(lines).rstrip() + "\n"


def charts(cells: dict[tuple[str, str, str], Cell], nets: list[NetProfile], workloads: list[str],
           modes: list[str], out: Path) -> list[Path]:
    """Per network profile: stacked pull + run-to-ready seconds, and MB fetched until ready, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for net in nets:
        present = [m for m in modes if any((net.name, w, m) in cells and cells[(net.name, w, m)].runs
                                           for w in workloads)]
        if not present:
            continue
        width = 0.8 / len(present)
        for metric in ("ready", "bytes"):
            fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(workloads) + 2), 4.5))
            for i, mode in enumerate(present):
                xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(workloads))]
                cs = [cells.get((net.name, w, mode)) for w in workloads]
                if metric == "ready":
                    pull = [(c.median("pull_s") or 0.0) if c else 0.0 for c in cs]
                    ready = [(c.median("ready_s") or 0.0) if c else 0.0 for c in cs]
                    bars = ax.bar(xs, pull, width, label=f"{mode} pull")
                    # Same colour, lighter: the run-to-ready part sits on top of its pull.
                    ax.bar(xs, ready, width, bottom=pull, label=f"{mode} run to ready",
                           color=bars.patches[0].get_facecolor(), alpha=0.45)
                else:
                    ax.bar(xs, [((c.median("bytes_ready") or 0.0) / 1e6) if c else 0.0 for c in cs], width,
                           label=mode)
            ax.set_xticks(range(len(workloads)), workloads)
            if metric == "ready":
                ax.set_ylabel("seconds (pull, then run to ready)")
                ax.set_title(f"Time to ready, {net.name}")
            else:
                ax.set_ylabel("MB fetched from the registry until ready")
                ax.set_yscale("symlog", linthresh=1.0)
                ax.set_title(f"Bytes fetched, {net.name}")
            ax.legend(fontsize=7, ncols=2)
            fig.tight_layout()
            path = out / f"{metric}-{net.name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# --- command line --------------------------------------------------------------------


def _split(values: list[str] | None, default: tuple[str, ...], known: dict[str, Any], what: str) -> list[str]:
    items = [x for v in (values or []) for x in v.split(",") if x] or list(default)
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"soci-bench suite: unknown {what} {', '.join(bad)} (known: {', '.join(known)})")
    return items


def cmd_build(args: argparse.Namespace) -> int:
    names = _split(args.workloads, tuple(wl.WORKLOADS), wl.WORKLOADS, "workload")
    cache = Path(args.cache) if args.cache else wl.cache_root()
    for i, name in enumerate(names, 1):
        _progress(f"[{i}/{len(names)}] {name}")
        img = wl.build(wl.WORKLOADS[name], cache, _progress)
        _progress(f"[{i}/{len(names)}] {name}: {img.layout} ({img.compressed_bytes / 1e6:.1f} MB compressed)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    names = _split(args.workloads, DEFAULT_WORKLOADS, wl.WORKLOADS, "workload")
    modes = _split(args.modes, DEFAULT_MODES, MODES, "mode")
    nets = [PROFILES[n] for n in _split(args.net, ("loopback", "200mbit"), PROFILES, "network profile")]
    if "full" not in modes:
        modes.insert(0, "full")
    skipped: dict[str, str] = {}
    lazy_why = lazy_support()
    if lazy_why:
        skipped.update({m: lazy_why for m in modes if m in LAZY})
    if "stargz" in modes:
        skipped["stargz"] = stargz_support() or ""
    run_modes = [m for m in modes if m not in skipped]
    cache = Path(args.cache) if args.cache else wl.cache_root()
    out = Path(args.out) if args.out else Path(f"soci-bench-suite-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    _progress(f"== images ({', '.join(names)})")
    images = [wl.build(wl.WORKLOADS[n], cache, _progress) for n in names]
    work = Path(tempfile.mkdtemp(prefix="soci-bench-suite-"))
    cells: dict[tuple[str, str, str], Cell] = {}
    indexes: dict[str, IndexInfo] = {}
    started = time.monotonic()
    methods: dict[str, str] = {}  # how each shaped link was made, for the report
    try:
        regdir = work / "registry"
        _progress(f"== registry: push, SOCI indexes (spans of {_layout(args.span_size, args.head_span)})")
        indexes = prepare_registry(regdir, images, run_modes, args.min_layer_size, work, args.span_size,
                                   args.head_span, Path(args.state_dir))
        total = len(nets) * len(images) * args.runs * len(run_modes)
        n = 0
        for net in nets:
            ns_ctx = NetNamespace() if net.shaped else nullcontext(None)
            with ns_ctx as ns:
                reg = registry_for(net, ns, regdir)
                with reg:
                    if ns is not None:
                        methods[net.name] = ns.method
                    _progress(f"== {net.name}: {net.describe(methods.get(net.name))}, registry {reg.host}")
                    for img in images:
                        w = img.workload
                        refs = refs_for(reg, w)
                        # Interleaved: A B C A B C, so that drift on a shared machine hits every mode alike.
                        for i in range(args.runs):
                            for mode in run_modes:
                                n += 1
                                cell = cells.setdefault((net.name, w.name, mode), Cell(net.name, w.name, mode))
                                head = f"[{n}/{total}] {net.name} {w.name} {mode} run {i + 1}/{args.runs}"
                                try:
                                    r = measure(reg, w, mode, refs, Path(args.state_dir))
                                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                                    cell.errors.append(str(e))
                                    _progress(f"{head}: FAILED {str(e)[:300]}")
                                    continue
                                cell.runs.append(r)
                                rss = f", RSS {r.rss_peak / 1e6:.0f} MB" if r.rss_peak else ""
                                _progress(f"{head}: pull {r.pull_s:.2f} s + ready {r.ready_s:.2f} s, "
                                          f"{r.bytes_ready / 1e6:.1f} MB{rss}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = markdown(cells, nets, names, modes, skipped, args.runs, methods, args.span_size, indexes,
                     args.head_span)
    print(table, end="", flush=True)
    full_of = {(c.net, c.workload): c for c in cells.values() if c.mode == "full"}
    doc = {
        "suite": "lazy start against full pull",
        "runs": args.runs, "min_layer_size": args.min_layer_size, "span_size": args.span_size,
        "head_span": args.head_span,
        "seconds": round(time.monotonic() - started, 1),
        "networks": {n.name: n.describe(methods.get(n.name)) for n in nets},
        "workloads": {img.workload.name: {"about": img.workload.about, "command": list(img.workload.command),
                                          "layers": img.layers, "compressed_bytes": img.compressed_bytes,
                                          "soci_index": (asdict(indexes[img.workload.name])
                                                         if img.workload.name in indexes else None)}
                      for img in images},
        "modes": {m: MODES[m] for m in modes},
        "skipped": skipped,
        "results": [{"net": c.net, "workload": c.workload, "mode": c.mode, "runs": [asdict(r) for r in c.runs],
                     "errors": c.errors, "summary": _summary(c, full_of.get((c.net, c.workload)))}
                    for c in cells.values()],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "results.md").write_text(table)
    pngs = charts(cells, nets, names, modes, out)
    _progress(f"== wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(p.name for p in pngs)}")
    failed = sum(len(c.errors) for c in cells.values())
    return 1 if failed and not any(c.runs for c in cells.values()) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soci-bench suite", description=__doc__)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    b = sub.add_parser("build", help="build (or finish building) the workload images into the cache")
    b.add_argument("--workloads", action="append", help=f"comma-separated (default: all: {', '.join(wl.WORKLOADS)})")
    b.add_argument("--cache", help="image cache directory (default: the user cache dir)")
    b.set_defaults(func=cmd_build)
    r = sub.add_parser("run", help="measure (the default action)")
    for q in (p, r):
        # On `run`, options default to "absent" so that ones given before the action are kept.
        d = (lambda v: v) if q is p else (lambda v: argparse.SUPPRESS)
        q.add_argument("--workloads", action="append", default=d(None),
                       help=f"comma-separated (default: {','.join(DEFAULT_WORKLOADS)}; all: {','.join(wl.WORKLOADS)})")
        q.add_argument("--modes", action="append", default=d(None),
                       help=f"comma-separated (default: {','.join(DEFAULT_MODES)}); full pull is always included")
        q.add_argument("--net", action="append", default=d(None),
                       help=f"comma-separated network profiles (default: loopback,200mbit; all: {','.join(PROFILES)})")
        q.add_argument("--runs", type=int, default=d(5), help="cold starts per workload and mode (default 5)")
        q.add_argument("--out", default=d(None), help="directory for results.json, results.md and the PNG charts")
        q.add_argument("--cache", default=d(None), help="image cache directory (default: the user cache dir)")
        q.add_argument("--min-layer-size", type=int, default=d(10 << 20),
                       help="layers smaller than this get no zTOC (default 10 MiB, as soci create)")
        q.add_argument("--span-size", type=parse_size, default=d(DEFAULT_SPAN_SIZE),
                       help="uncompressed bytes per span of the SOCI indexes built for the run, passed to "
                            "soci create/convert --span-size; K and M suffixes are binary (default 4 MiB, "
                            "as soci create)")
        q.add_argument("--head-span", type=parse_size, default=d(0),
                       help="soci create/convert --head-span for the run's indexes: big files get a short first "
                            "span of their own (default 0, upstream's layout)")
        q.add_argument("--state-dir", default=d("/tmp"),
                       help="where each run's fresh tmpfs is mounted (default /tmp; keep it short: socket paths)")
        q.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_rpull"]:
        return _rpull_main(argv[1:])
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("soci-bench suite: needs root (containerd, mounts, network namespaces)", file=sys.stderr)
        return 2
    if args.action != "build" and args.runs < 1:
        raise SystemExit("soci-bench suite: --runs must be at least 1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
