"""A deployment made of real hosts on this machine: network namespaces joined by bridges.

Each host is a network namespace with its own interfaces, addresses and (through
``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``) its own hosts
file. Two networks, each a Linux bridge in a switch namespace of its own: the *front* (clients,
the upstream, the relays' public side) and the *back* (the store, the relays' private side,
monitoring). Nothing is added to the machine's own namespace: no interface, no route, no
address; the addresses (198.18.0.0/15, reserved for network tests by RFC 2544) exist only
inside the lab's namespaces, which have no route anywhere else.

Links are cut in the kernel (``ip link set <port> down`` on the switch: the host keeps its
address and hears nothing, as when a cable is pulled at the switch). Delay and jitter come from
a user-space TCP proxy on the store host (``tests/netlab_proxy.py``): the kernel's netem qdisc
is not available on this machine.

The test process reaches into the lab through ``forward``: a port on its own loopback whose
connections are made from inside a lab namespace (a thread that entered it with setns(2)).

Everything is removed by ``close`` (processes first, then the namespaces, which take their
interfaces and bridges with them, then the hosts files); a lab left by a test run that was
killed is removed by the next one (the namespaces are named after the pid that made them).
Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "rlab"
CLONE_NEWNET = 0x40000000
FRONT, BACK = "198.18.1", "198.18.2"  # /24 each


def why_not() -> str | None:
    """Why this machine cannot build a lab (None when it can): the namespace tests skip with it."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and bridges)"
    if not shutil.which("ip"):
        return "needs iproute2's ip"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Namespaces left by a lab whose test process is gone (killed before it could clean up):
    their processes (started by that run) are ended and the namespaces removed."""
    removed = []
    for ns in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-.+", ns)
        if m and not _alive(int(m.group(1))):
            _empty_and_delete(ns)
            removed.append(ns)
    return removed


def _pids_in(ns: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", ns, check=False).split()]


def _empty_and_delete(ns: str) -> None:
    for pid in _pids_in(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pids_in(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    ip("netns", "del", ns, check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


@dataclass
class Host:
    name: str
    ns: str
    front: str | None = None  # its address on the front network
    back: str | None = None   # on the back network


@dataclass
class Proc:
    """A process started on a lab host (its own session: it and its children end together)."""

    name: str
    host: Host
    popen: subprocess.Popen[bytes]
    log_path: Path
    _replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _next_id: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int | None = 4000) -> str:
        """The end of its log (all of it with ``tail=None``)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """``sig`` to the process's group; SIGKILL if it has not ended within ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    # A process started with ``control=True`` reads JSON commands on stdin, one a line, and
    # answers each with a JSON line carrying the command's "id" (tests/netlab_agent.py and
    # tests/netlab_proxy.py). Commands may overlap: each answer finds its caller by id.

    def _read_replies(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                with self._cond:
                    self._replies[reply.get("id", -1)] = reply
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # closed: the process has ended
        with self._cond:
            self._cond.notify_all()

    def call(self, wait_s: float = 60.0, **command: Any) -> dict[str, Any]:
        assert self.popen.stdin is not None, f"{self.name} takes no commands"
        with self._cond:
            self._next_id += 1
            cid = self._next_id
        self.popen.stdin.write((json.dumps({"id": cid, **command}) + "\n").encode())
        self.popen.stdin.flush()
        deadline = time.monotonic() + wait_s
        with self._cond:
            while cid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive():
                    raise AssertionError(f"{self.name}: no answer to {command} within {wait_s} s\n{self.log()}")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(cid)
        if "error" in reply:
            raise AssertionError(f"{self.name}: {command} failed: {reply['error']}")
        return reply

    async def acall(self, wait_s: float = 60.0, **command: Any) -> dict[str, Any]:
        """``call`` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.call(wait_s, **command))


class _Forwarder(threading.Thread):
    """Connections to ports on this process's loopback, made again from inside one lab namespace.

    The thread enters the namespace (setns(2) applies to the calling thread only) and runs an
    event loop there: sockets it creates live in the namespace; the listening sockets, made by
    the caller before they are handed over, stay on this namespace's loopback."""

    def __init__(self, ns: str):
        super().__init__(name=f"netlab-forward-{ns}", daemon=True)
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.Server] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.entered = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                self.error = f"setns: {os.strerror(ctypes.get_errno())}"
        finally:
            os.close(fd)
        self.entered.set()
        if self.error is None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_forever()
        self.loop.close()

    def forward(self, address: str, port: int) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
            except (OSError, TimeoutError):
                writer.close()
                return
            self.writers.update((writer, up_writer))
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            self.writers.difference_update((writer, up_writer))

        async def serve() -> None:
            self.servers.append(await asyncio.start_server(handle, sock=listener))

        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return int(listener.getsockname()[1])

    def close(self) -> None:
        async def shut() -> None:
            for server in self.servers:
                server.close()
            for w in list(self.writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.join(10)


class Lab:
    """Hosts on two networks; ``up()`` builds them, ``close()`` removes every trace."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self.forwarders: dict[str, _Forwarder] = {}
        self._ports: dict[tuple[str, str], str] = {}  # (host, network) -> its port on the bridge
        self.made: list[str] = []  # namespaces this lab made

    # --- building -------------------------------------------------------------------------

    def up(self, hosts: dict[str, tuple[int | None, int | None]]) -> Lab:
        """``hosts``: name -> (last octet on the front network or None, on the back or None)."""
        remove_stale()
        self._netns(self.switch)
        for net in ("front", "back"):
            ip("-n", self.switch, "link", "add", net, "type", "bridge")
            ip("-n", self.switch, "link", "set", net, "up")
        for name, (front, back) in hosts.items():
            host = self.hosts[name] = Host(name, f"{self.tag}-{name}",
                                           f"{FRONT}.{front}" if front else None, f"{BACK}.{back}" if back else None)
            self._netns(host.ns)
            for net, address in (("front", host.front), ("back", host.back)):
                if address:
                    self._plug(host, net, address)
        return self

    def _netns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _plug(self, host: Host, net: str, address: str) -> None:
        port = f"{host.name[:8]}-{net[0]}"  # the bridge's side, in the switch namespace
        ip("link", "add", "name", port, "netns", self.switch, "type", "veth", "peer", "name", f"eth-{net}",
           "netns", host.ns)
        ip("-n", self.switch, "link", "set", port, "master", net, "up")
        ip("-n", host.ns, "addr", "add", f"{address}/24", "dev", f"eth-{net}")
        ip("-n", host.ns, "link", "set", f"eth-{net}", "up")
        self._ports[(host.name, net)] = port

    def hosts_file(self, host: str, names: dict[str, str]) -> None:
        """``host``'s own /etc/hosts: these names (-> addresses), and localhost."""
        ns = self.hosts[host].ns
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{addr} {name}" for name, addr in names.items())]
        Path(f"/etc/netns/{ns}/hosts").write_text("\n".join(lines) + "\n")

    # --- processes ------------------------------------------------------------------------

    def run(self, host: str, name: str, argv: list[str], env: dict[str, str] | None = None,
            control: bool = False) -> Proc:
        """``argv`` on ``host`` (``ip netns exec``, which execs it: the pid is the command's)."""
        h = self.hosts[host]
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", h.ns, *argv], cwd=ROOT, env={**os.environ, **(env or {})},
                stdin=subprocess.PIPE if control else subprocess.DEVNULL,
                stdout=subprocess.PIPE if control else log, stderr=log, start_new_session=True)
        proc = Proc(name, h, popen, log_path)
        self.procs.append(proc)
        if control:
            threading.Thread(target=proc._read_replies, name=f"netlab-{name}", daemon=True).start()
        return proc

    def python(self, host: str, name: str, *args: str, env: dict[str, str] | None = None,
               control: bool = False) -> Proc:
        return self.run(host, name, [sys.executable, *args], env, control)

    @contextlib.contextmanager
    def realtime(self, *names: str) -> Iterator[None]:
        """These processes (every thread) at real-time priority (SCHED_FIFO 10) for the block,
        then back to the normal policy: a latency measured across three processes on a machine
        whose other work keeps both cores busy is otherwise mostly scheduling delay (5-10 ms,
        varying by ±1 ms from run to run). Only for a short measurement of processes that wait
        on each other (at most one core's work); the kernel's RT throttling caps them anyway."""
        procs = [p for p in self.procs if p.name in names]
        assert len(procs) == len(names), names

        def policy(policy: int, priority: int) -> None:
            for proc in procs:
                for tid in os.listdir(f"/proc/{proc.pid}/task"):
                    with contextlib.suppress(ProcessLookupError):
                        os.sched_setscheduler(int(tid), policy, os.sched_param(priority))

        policy(os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 10)
        try:
            yield
        finally:
            policy(os.SCHED_OTHER, 0)

    # --- links ----------------------------------------------------------------------------

    def cut(self, host: str, net: str) -> None:
        """Pull ``host``'s cable on ``net`` at the switch: it hears nothing there, and nobody hears it."""
        ip("-n", self.switch, "link", "set", self._ports[(host, net)], "down")

    def heal(self, host: str, net: str) -> None:
        ip("-n", self.switch, "link", "set", self._ports[(host, net)], "up")

    def forward(self, host: str, address: str, port: int) -> int:
        """A port on this process's loopback that reaches ``address:port`` from ``host``."""
        fw = self.forwarders.get(host)
        if fw is None:
            fw = self.forwarders[host] = _Forwarder(self.hosts[host].ns)
            fw.start()
            fw.entered.wait(10)
            assert fw.error is None, fw.error
        return fw.forward(address, port)

    def reachable(self, host: str, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether ``host`` can open a TCP connection to ``address:port`` (from inside it)."""
        code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                f"timeout={timeout}).close()\nexcept OSError:\n sys.exit(1)")
        done = subprocess.run(["ip", "netns", "exec", self.hosts[host].ns, sys.executable, "-c", code, address,
                               str(port)], capture_output=True, timeout=timeout + 20)
        return done.returncode == 0

    # --- the end --------------------------------------------------------------------------

    def close(self) -> None:
        """Every process ended, every forward closed, every namespace (with its interfaces and
        bridges) and hosts file removed. Safe to call twice."""
        for proc in reversed(self.procs):
            proc.stop(signal.SIGTERM, timeout=10)
        for fw in self.forwarders.values():
            fw.close()
        self.forwarders.clear()
        for ns in reversed(self.made):
            if ns in namespaces():
                _empty_and_delete(ns)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What this lab left behind: namespaces, hosts files, live processes, forward threads."""
        left = [f"namespace {ns}" for ns in namespaces() if ns.startswith(self.tag + "-")]
        left += [f"hosts file of {ns}" for ns in self.made if os.path.exists(f"/etc/netns/{ns}")]
        left += [f"process {p.name} ({p.pid})" for p in self.procs if p.alive()]
        left += [f"thread {t.name}" for t in threading.enumerate() if t.name.startswith("netlab-forward")]
        return left


# --- the deployment of issue 19: two relay hosts, one store -------------------------------

STORE_PORT = 27017
LINK_PORTS = {"a": 27101, "b": 27102}  # the store host's proxy, one listener per relay host
RELAY_PORT = 8080
UPSTREAM_PORT = 9000
PROMETHEUS_PORT = 9090
PRIMARY, BACKUP = "api.relay.test", "api-backup.relay.test"  # .test: reserved, never resolvable outside
ADMIN_TOKEN = "lab-admin-token-0123456789"
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
# Hosts: name -> (last octet on the front network, on the back network).
HOSTS: dict[str, tuple[int | None, int | None]] = {
    "store": (None, 2), "a": (11, 11), "b": (12, 12), "client": (20, None), "upstream": (30, None), "mon": (None, 40)}


class Deployment:
    """The store host (the embedded server on its own address, and the links' proxy), relay
    hosts A and B (front and back), an upstream host (the fake upstream), a client host whose
    hosts file names A the primary and B the backup (and its agent, tests/netlab_agent.py), and
    a monitoring host for Prometheus. B's clock can be skewed (libfaketime): ``skew_b``."""

    def __init__(self, workdir: Path, skew_b: str | None = None):
        self.workdir = workdir
        self.lab = Lab(workdir)
        self.skew_b = skew_b
        self.relays: dict[str, Proc] = {}
        self.links: Proc | None = None
        self.agent: Proc | None = None
        self.store_port = 0  # the store, from this process (a forward)

    def host(self, name: str) -> Host:
        return self.lab.hosts[name]

    @property
    def store_address(self) -> str:
        address = self.host("store").back
        assert address
        return address

    def store_uri(self, port: int | None = None, address: str | None = None) -> str:
        return f"mongodb://{address or self.store_address}:{port or STORE_PORT}/relay?directConnection=true"

    def url(self, name: str) -> str:
        """A relay as the client names it: "primary" or "backup"."""
        return f"http://{PRIMARY if name == 'primary' else BACKUP}:{RELAY_PORT}"

    def start(self) -> Deployment:
        from relay.store.embedded import _server_command
        from tests.helpers import one_upstream_config
        lab = self.lab.up(HOSTS)
        a, b = self.host("a"), self.host("b")
        lab.hosts_file("client", {PRIMARY: str(a.front), BACKUP: str(b.front)})
        store = self.store_address
        # The embedded store's own command line (secantusd-py ... --sync-on-commit), on the host's address.
        lab.run("store", "store", [*_server_command(STORE_PORT, str(self.workdir / "store")), "--host", store])
        self.links = lab.python("store", "links", "-m", "tests.netlab_proxy", "--to", f"{store}:{STORE_PORT}",
                                *(f"--link={h}={store}:{p}" for h, p in LINK_PORTS.items()), control=True)
        lab.python("upstream", "upstream", "-m", "relay", "fake-upstream", "--host", str(self.host("upstream").front),
                   "--port", str(UPSTREAM_PORT))
        self._wait(lambda: lab.reachable("a", store, STORE_PORT), "the store answers on its address")
        config = self.workdir / "upstreams.yaml"
        config.write_text(one_upstream_config(f"http://{self.host('upstream').front}:{UPSTREAM_PORT}/v1"))
        for name in ("a", "b"):
            env = {"RELAY_ADMIN_TOKEN": ADMIN_TOKEN}
            if name == "b" and self.skew_b:
                env.update(LD_PRELOAD=FAKETIME_LIB, FAKETIME=self.skew_b, DONT_FAKE_MONOTONIC="1")
            self.relays[name] = lab.python(
                name, f"relay-{name}", "-m", "relay", "serve", "--config", str(config), "--host", "0.0.0.0",
                "--port", str(RELAY_PORT), "--mongodb-uri", self.store_uri(LINK_PORTS[name]),
                "--data-dir", str(self.workdir / f"data-{name}"), env=env)
        self.agent = lab.python("client", "client", "-m", "tests.netlab_agent", control=True)
        for name in ("primary", "backup"):
            self._wait(lambda n=name: self._healthy(n), f"relay {name} answers the client by name", 90)
        self.store_port = lab.forward("store", store, STORE_PORT)
        return self

    def _healthy(self, name: str) -> bool:
        assert self.agent is not None
        for relay in self.relays.values():
            assert relay.alive(), f"{relay.name} exited:\n{relay.log()}"
        try:
            return self.agent.call(10, op="fetch", url=self.url(name) + "/healthz")["status"] == 200
        except AssertionError:
            return False

    @staticmethod
    def _wait(ready: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            time.sleep(0.2)

    def instance(self, relay: str) -> str:
        """The relay's process id in the store (owner of its leases), from its start-up line."""
        m = re.search(r"in the store this process is (\S+)", self.relays[relay].log(tail=None))
        assert m, self.relays[relay].log()
        return m.group(1)

    def set_delay(self, relay: str, delay_ms: float, jitter_ms: float = 0.0) -> None:
        assert self.links is not None
        self.links.call(link=relay, delay_ms=delay_ms, jitter_ms=jitter_ms)

    def close(self) -> None:
        self.lab.close()
