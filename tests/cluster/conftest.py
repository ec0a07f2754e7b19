"""A real Redis Cluster (3 masters, 3 replicas) and a Sentinel-managed Redis, on loopback."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, free_port
from tests.support import wait_until


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, so both are below 65536."""
    while True:
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


class Cluster:
    """Six cluster-enabled redis-servers joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [
            RedisServer(workdir / f"node{i}", (
                "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                "--cluster-require-full-coverage", "no", "--cluster-allow-reads-when-down", "no",
            ))
            for i in range(6)
        ]  # fmt: skip
        for node in self.nodes:
            node.port = cluster_port()
            node.workdir.mkdir(parents=True)
            node.extra = (*node.extra, "--cluster-config-file", str(node.workdir / "nodes.conf"))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(self.healthy, 30, "the cluster forming")
        return self

    def healthy(self) -> bool:
        """Every running node sees all slots served."""
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                info = node.client().cluster("info")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
        return True

    def masters(self) -> list[RedisServer]:
        client = redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
        ports = {node.port for node in client.get_primaries()}
        client.close()
        return [n for n in self.nodes if n.port in ports and n.process is not None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


class Sentinel:
    """A master, a replica and three sentinels watching them as ``mymaster``."""

    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica")
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.workdir = workdir

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/mymaster/0"

    def start(self) -> Sentinel:
        for server in (self.master, self.replica):
            server.workdir.mkdir(parents=True)
        self.master.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 3000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            binary = (
                shutil.which("redis-sentinel") or shutil.which("redis-server") or "redis-server"
            )
            args = (
                [binary, str(conf)]
                if binary.endswith("sentinel")
                else [binary, str(conf), "--sentinel"]
            )
            self.sentinels.append(subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))  # fmt: skip
        wait_until(lambda: self.master_port() == self.master.port, 20, "the sentinels agreeing")
        return self

    def master_port(self) -> int | None:
        try:
            client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
            host_port = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", "mymaster")
            client.close()
        except redis.RedisError:
            return None
        return int(host_port[1]) if host_port else None

    def stop(self) -> None:
        for process in self.sentinels:
            process.terminate()
            process.wait(10)
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    sentinel = Sentinel(tmp_path).start()
    yield sentinel
    sentinel.stop()
