"""The embedded end-to-end demo: one container started lazily through the SOCI snapshotter, then after a full pull."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench import e2e, suite
from .sandbox.containerd import SociSandbox
from .sandbox.procs import pids_matching
from .sandbox.registry import LocalRegistry
from .sandbox.signals import UnwindOnSignal

TOOLS = ("containerd", "ctr", "runc", "docker-registry", "skopeo", "tar", "gzip")
MOUNT_HELPERS = ("/sbin/mount.fuse.soci", "/usr/sbin/mount.fuse.soci")
ORDER = (e2e.LAZY_MODE, "full")
HOW = {
    e2e.LAZY_MODE: "soci image rpull, then ctr run --snapshotter soci (indexed layer mounted lazily over FUSE)",
    "full": "ctr images pull, then ctr run with containerd's default overlayfs snapshotter",
}
LABEL = {e2e.LAZY_MODE: "lazy", "full": "full"}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def _missing() -> list[str]:
    out = [t for t in TOOLS if shutil.which(t) is None]
    if not any(os.path.exists(p) for p in MOUNT_HELPERS):
        out.append("mount.fuse.soci (bash packaging/dev setup installs it)")
    if not any(os.path.isfile(p) for p in ("/bin/busybox", "/usr/bin/busybox")):
        out.append("busybox-static")
    return out


def _reap_layer_servers(workdir: Path) -> int:
    """Kill layer servers still serving a root below `workdir` (a run that was cut short); how many."""
    killed = 0
    for pid in pids_matching(str(workdir), e2e.SERVER_MODULE, substring=True):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def run(workdir: Path) -> None:
    t_start = time.monotonic()
    say("soci-helper demo: a container started lazily from a SOCI index, and the same container after a full pull")
    say("state: a temporary directory, containerd and snapshotter state on a fresh tmpfs for each start")
    say()

    say("[1/5] sample image: one big gzip layer of real files from this machine, busybox and a script on top")
    t0 = time.monotonic()
    image = e2e.build_sample_image(workdir / "image", say=say)
    say(f"  {image.describe()} ({time.monotonic() - t0:.1f} s)")
    say(f"  the container runs `{' '.join(e2e.COMMAND)}`: echo a line, then sha256sum {' '.join(image.probes)}")

    with LocalRegistry(workdir=workdir / "registry") as reg:
        say(f"[2/5] registry: docker-registry on {reg.url}, pushing the image and its SOCI index")
        t0 = time.monotonic()
        ref, ztocs = e2e.publish(reg, image, workdir / "soci-build")
        say(f"  pushed {ref}")
        for line in ztocs:
            say(f"  soci create: {line}")
        say(f"  soci push: index and zTOC pushed next to the image ({time.monotonic() - t0:.1f} s)")
        shutil.rmtree(image.layout, ignore_errors=True)

        refs = suite.Refs(full=ref, v1=ref, v2="")
        results: dict[str, suite.Run] = {}
        for step, mode in enumerate(ORDER, start=3):
            say(f"[{step}/5] {LABEL[mode]}: new containerd + snapshotter daemon; {HOW[mode]}")
            outputs: list[str] = []
            servers: list[int] = []

            def inspect(sb: SociSandbox, output: str, outputs: list[str] = outputs,
                        servers: list[int] = servers) -> None:
                outputs.append(output)
                servers.extend(e2e.layer_servers(sb.snapshotter.root))

            r = suite.measure(reg, e2e.workload(), mode, refs, workdir, inspect=inspect)
            results[mode] = r
            for line in outputs[0].splitlines():
                say(f"  [{LABEL[mode]}] {line}")
            why = e2e.check_output(image, outputs[0])
            if why is not None:
                raise SystemExit(f"demo: the {LABEL[mode]} container printed the wrong output: {why}")
            say("  output correct: the line, and both sha256 sums match the files on this machine")
            if mode == e2e.LAZY_MODE:
                say(f"  {len(servers)} layer server(s) served the big layer lazily")
            say(f"  pull {r.pull_s:.2f} s + run to first output {r.ready_s:.2f} s = {r.total_s:.2f} s; "
                f"{r.bytes_ready / e2e.MB:.2f} MB from the registry")
            # A layer server ends on its own once its FUSE connection goes with the unmounted tmpfs; give it time.
            t_gone = time.monotonic()
            while (left := left_behind(workdir, keep="docker-registry")) and time.monotonic() - t_gone < 10:
                time.sleep(0.1)
            if left:
                say(f"  still running or mounted after 10 s, removed at the end: {'; '.join(left)}")
            else:
                say("  stopped containerd, its shims, the daemon and the layer servers; unmounted the state")

    lazy, full = results[e2e.LAZY_MODE], results["full"]
    say()
    say("| mode | pull s | run to first output s | total s | MB from the registry |")
    say("|---|---|---|---|---|")
    for mode in ORDER:
        r = results[mode]
        name = "lazy (soci)" if mode == e2e.LAZY_MODE else "full pull (overlayfs)"
        say(f"| {name} | {r.pull_s:.2f} | {r.ready_s:.2f} | {r.total_s:.2f} | {r.bytes_ready / e2e.MB:.2f} |")
    speed = full.total_s / lazy.total_s if lazy.total_s > 0 else float("inf")
    share = lazy.bytes_ready / full.bytes_ready if full.bytes_ready else 0.0
    say()
    say(f"lazy start: {speed:.1f}x faster than the full pull, with {share:.1%} of its bytes "
        f"(bytes: lazy {lazy.bytes_ready}, full {full.bytes_ready})")
    say(f"demo finished in {time.monotonic() - t_start:.1f} s")


def left_behind(workdir: Path, keep: str | None = None) -> list[str]:
    """Processes whose command line names `workdir` (containerd, shims, daemon, layer servers, registry) and
    mounts below it; processes whose command line contains `keep` are still wanted."""
    out = []
    for pid in pids_matching(str(workdir), substring=True):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if keep is None or keep not in argv:
            out.append(f"process {pid}: {argv.strip()[:160]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[4].startswith(str(workdir) + "/"):
            out.append(f"mount {parts[4]}")
    return out


def _cleanup(workdir: Path) -> None:
    """Whatever a cut-short run may have left below `workdir`: layer servers, mounts, the directory itself."""
    from .sandbox.containerd import unmount_all_under

    killed = _reap_layer_servers(workdir)
    unmount_all_under(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    if killed:
        print(f"demo: stopped {killed} leftover layer server(s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soci-demo", description=__doc__)
    p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (containerd, runc, FUSE and tmpfs mounts)", file=sys.stderr)
        return 2
    if missing := _missing():
        print(f"demo: missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    signals = UnwindOnSignal("demo")
    signals.install()
    # Short: containerd's sockets live below it and unix socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="soci-demo-", dir="/tmp"))
    try:
        run(workdir)
        return 0
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"demo: failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        # From here on a signal only gets a message: the cleanup must run to its end.
        signals.seen = max(signals.seen, 1)
        _cleanup(workdir)
        left = left_behind(workdir)
        if left:
            print(f"demo: left behind: {'; '.join(left)}", file=sys.stderr, flush=True)
        else:
            say("cleaned up: registry, containerd, shims, daemon, layer servers, mounts and the temporary directory")


if __name__ == "__main__":
    sys.exit(main())
