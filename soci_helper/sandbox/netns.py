"""A registry in its own network namespace behind a veth pair, with tc netem shaping; always torn down.

Kernels built without netem (sch_netem) get the same link from pieces that exist nearly everywhere:
tbf limits the rate on both veth ends, and a small relay inside the namespace delays each direction.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from .registry import START_TIMEOUT, LocalRegistry, RegistryStartError

REGISTRY_PORT = 5000


@dataclass(frozen=True, slots=True)
class NetProfile:
    """A link: `rate` (tc syntax, e.g. 200mbit) and one-way `delay_ms` on each direction; None = loopback."""

    name: str
    rate: str | None = None
    delay_ms: float = 0.0

    @property
    def shaped(self) -> bool:
        return self.rate is not None

    def describe(self, method: str | None = None) -> str:
        """What the link is; `method` is how it was shaped (netem, or tbf+relay where the kernel lacks netem)."""
        if not self.shaped:
            return "loopback (no namespace, no shaping)"
        how = f"{method}: " if method else ""
        return (f"veth, {how}rate {self.rate}, delay {self.delay_ms:g} ms each way "
                f"(RTT {2 * self.delay_ms:g} ms)")


PROFILES: dict[str, NetProfile] = {
    "loopback": NetProfile("loopback"),
    "200mbit": NetProfile("200mbit", "200mbit", 10.0),
    "50mbit": NetProfile("50mbit", "50mbit", 40.0),
}


class NetnsError(RuntimeError):
    """The namespace, the veth pair or the qdisc could not be set up."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _tc(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", netns, "tc", *args] if netns else ["tc", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)}: {r.stderr.strip()}")
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        for tok in line.split():
            if "/" in tok and tok[0].isdigit():
                try:
                    out.append(ipaddress.IPv4Interface(tok).network)
                except ValueError:
                    pass
    for line in _ip("-4", "route", "show", check=False).stdout.splitlines():
        tok = line.split()[0] if line.split() else ""
        if tok and tok[0].isdigit():
            try:
                out.append(ipaddress.IPv4Network(tok, strict=False))
            except ValueError:
                pass
    return out


def _free_slash30(rng: random.Random) -> ipaddress.IPv4Network:
    """A random 10.x.y.z/30 that overlaps nothing routed on this machine (other runs pick their own)."""
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.IPv4Network((rng.randrange(0, 1 << 22) << 2 | 10 << 24, 30))
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsError("no free 10.0.0.0/8 /30 found")


# Namespaces still up in this process: atexit and the signal handlers tear them down.
_LIVE: set[NetNamespace] = set()
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def _teardown_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for ns in live:
        ns.down()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Unwind through every `with` block (containerd, registry, namespace) instead of dying where we stand.
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


class NetNamespace:
    """`ip netns` NAME with one end of a veth pair; the other end stays here. Addresses: a private /30.

    `host_addr` is this side, `ns_addr` the namespace side. `shape(profile)` puts netem on both ends,
    so each direction gets the rate and the one-way delay. `down()` is idempotent and also runs at exit.
    """

    def __init__(self, tag: str = "sb") -> None:
        rng = random.Random(os.urandom(8))
        suffix = f"{os.getpid() % 100000:05d}{rng.randrange(36 ** 2):03x}"[-7:]
        self.name = f"soci-bench-{tag}-{suffix}"
        # Interface names are limited to 15 bytes.
        self.host_if = f"sbh{suffix}"
        self.ns_if = f"sbn{suffix}"
        net = _free_slash30(rng)
        hosts = list(net.hosts())
        self.host_addr, self.ns_addr = str(hosts[0]), str(hosts[1])
        self.prefix = net.prefixlen
        self.method = "none"
        self._up = False

    def __hash__(self) -> int:
        return hash(self.name)

    def up(self) -> None:
        _install_handlers()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._up = True
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_addr}/{self.prefix}", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ns_addr}/{self.prefix}", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise

    def shape(self, profile: NetProfile) -> bool:
        """Shape both ends (replacing any earlier qdisc); True when the kernel also applies the delay.

        False means netem is missing: only the rate is shaped (tbf) and the caller must add the delay
        (NetnsRegistry does, with its relay). A loopback profile removes shaping.
        """
        if not profile.shaped:
            self.unshape()
            return True
        # A deep queue: with the default 1000 packets a TCP burst at this rate is dropped, not delayed.
        args = ["netem", "rate", str(profile.rate), "delay", f"{profile.delay_ms:g}ms", "limit", "10000"]
        r = _tc("qdisc", "replace", "dev", self.host_if, "root", *args, check=False)
        if r.returncode == 0:
            _tc("qdisc", "replace", "dev", self.ns_if, "root", *args, netns=self.name)
            self.method = "netem"
            return True
        if "unknown" not in r.stderr.lower():
            raise NetnsError(f"tc netem: {r.stderr.strip()}")
        # burst must hold a whole GSO packet (64 KiB on veth) or tbf splits every one of them.
        tbf = ["tbf", "rate", str(profile.rate), "burst", "256kb", "latency", "200ms"]
        _tc("qdisc", "replace", "dev", self.host_if, "root", *tbf)
        _tc("qdisc", "replace", "dev", self.ns_if, "root", *tbf, netns=self.name)
        self.method = "tbf+relay"
        return False

    def unshape(self) -> None:
        _tc("qdisc", "del", "dev", self.host_if, "root", check=False)
        _tc("qdisc", "del", "dev", self.ns_if, "root", netns=self.name, check=False)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def down(self) -> None:
        """Remove qdiscs, the veth pair and the namespace; never raises."""
        if not self._up:
            return
        self._up = False
        try:
            self.unshape()
        except (OSError, subprocess.SubprocessError):
            pass
        # Deleting one end deletes the pair; the namespace's end may already be gone with it.
        for args in (("link", "del", self.host_if), ("netns", "del", self.name)):
            try:
                _ip(*args, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def exists(self) -> bool:
        return self.name in _ip("netns", "list", check=False).stdout.split()

    def __enter__(self) -> NetNamespace:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


class NetnsRegistry(LocalRegistry):
    """A LocalRegistry whose process runs inside `netns`, reachable at the namespace's address only.

    relay_delay_ms > 0 (no netem): the registry listens on the namespace's loopback and a relay on the
    namespace address forwards each direction `relay_delay_ms` late.
    """

    def __init__(self, netns: NetNamespace, relay_delay_ms: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        if self.tls:
            raise ValueError("the namespaced registry serves plain HTTP only")
        self.netns = netns
        self.relay_delay_ms = relay_delay_ms
        self._relay: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.netns.ns_addr}:{self.port}"

    def _listen_addr(self) -> str:
        if self.relay_delay_ms > 0:
            return f"127.0.0.1:{REGISTRY_PORT + 1}"
        return f"{self.netns.ns_addr}:{self.port}"

    def _config(self) -> str:
        text = super()._config()
        return text.replace(f"  addr: 127.0.0.1:{self.port}\n", f"  addr: {self._listen_addr()}\n")

    def _spawn(self) -> None:
        assert self.dir is not None
        # The namespace is ours alone: a fixed port cannot clash.
        self.port = REGISTRY_PORT
        cfg = self.dir / "config.yml"
        cfg.write_text(self._config())
        self._log = self.dir / "registry.log"
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [*self.netns.exec_prefix(), "docker-registry", "serve", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            if self.relay_delay_ms > 0:
                self._relay = subprocess.Popen(
                    [*self.netns.exec_prefix(), sys.executable, "-m", __name__, "relay", self.netns.ns_addr,
                     str(REGISTRY_PORT), str(REGISTRY_PORT + 1), f"{self.relay_delay_ms:g}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env=_env_with_package(),
                )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for p in (self._proc, self._relay):
                if p is not None and p.poll() is not None:
                    raise RegistryStartError(f"registry or relay exited ({p.returncode}): {self.log_tail()}")
            try:
                if requests.get(self.url + "/v2/", timeout=2).status_code in (200, 401):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RegistryStartError(f"docker-registry not ready after {START_TIMEOUT}s: {self.log_tail()}")

    def _kill(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None and relay.poll() is None:
            try:
                os.killpg(relay.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            relay.wait(timeout=10)
        super()._kill()


def _env_with_package() -> dict[str, str]:
    env = dict(os.environ)
    # The relay must import this very package, wherever the caller runs from.
    parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward one direction, each chunk `delay` seconds after it arrived; reading never waits for writing."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(1 << 16)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass


async def _relay(listen_host: str, listen_port: int, target_port: int, delay_ms: float) -> None:
    delay = delay_ms / 1000.0

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            cw.close()
            return
        # The client's SYN/ACK round trip is not delayed; the first request/response pays 2 x delay.
        await asyncio.gather(_pump(cr, uw, delay), _pump(ur, cw, delay))
        for w in (cw, uw):
            w.close()

    server = await asyncio.start_server(handle, listen_host, listen_port, reuse_address=True)
    async with server:
        await server.serve_forever()


def _relay_main(argv: list[str]) -> int:
    host, port, target, delay = argv
    asyncio.run(_relay(host, int(port), int(target), float(delay)))
    return 0


def registry_for(profile: NetProfile, netns: NetNamespace | None, workdir: Path) -> LocalRegistry:
    """The registry a profile measures against: on loopback, or in `netns`, which this shapes."""
    if not profile.shaped:
        return LocalRegistry(workdir=workdir)
    if netns is None:
        raise ValueError(f"profile {profile.name} needs a network namespace")
    kernel_delay = netns.shape(profile)
    return NetnsRegistry(netns, relay_delay_ms=0.0 if kernel_delay else profile.delay_ms, workdir=workdir)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "relay":
        sys.exit(_relay_main(sys.argv[2:]))
    sys.exit("usage: python -m soci_helper.sandbox.netns relay LISTEN_HOST LISTEN_PORT TARGET_PORT DELAY_MS")
