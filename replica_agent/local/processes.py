"""Replicas and the router as OS processes on this machine, each replica on CPU cores of its own.

A GPU replica owns its GPU; here a replica owns its CPU core(s): the agent process is started with
that CPU affinity and one intra-op thread for its engine and one for its trainer, so the engine
and the trainer share the replica's core and co-execution has to earn its keep through the batch
mixer, not through a spare core. The router (and the harness that starts all this) run beside
them on any core; their CPU time is measured (`cpu_seconds`) so reports can state it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from ..config import AgentConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_sets(replicas: int, cores_per_replica: int = 1, available: set[int] | None = None) -> list[set[int]]:
    """Disjoint CPU sets, one per replica; ValueError when the machine has too few cores."""
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    need = replicas * cores_per_replica
    if need > len(cpus):
        raise ValueError(
            f"{replicas} replicas x {cores_per_replica} core(s) need {need} CPU cores, this machine gives {len(cpus)}: "
            "run fewer replicas (or give up core isolation: in-process replicas share the cores)"
        )
    return [set(cpus[i * cores_per_replica : (i + 1) * cores_per_replica]) for i in range(replicas)]


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    cores: set[int] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; the end of its log ({self.log_path}):\n{tail}")


def spawn(name: str, argv: list[str], log_dir: Path, cores: set[int] | None, env: dict[str, str]) -> ManagedProcess:
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "wb")
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, preexec_fn=preexec)
    log.close()
    return ManagedProcess(name, proc, log_path, cores)


@dataclass
class AgentProcess(ManagedProcess):
    http_url: str = ""
    grpc_address: str = ""


def start_agent(config: AgentConfig, log_dir: Path, cores: set[int] | None) -> AgentProcess:
    """`collm-agent` with `config` (as its YAML file) on fresh loopback ports, pinned to `cores`."""
    http_port, grpc_port = free_port(), free_port()
    config = config.model_copy(
        update={
            "port": http_port,
            "grpc_port": grpc_port,
            "host": "127.0.0.1",
            "engine_threads": config.engine_threads or 1,
            "trainer_threads": config.trainer_threads or 1,
        }
    )
    path = log_dir / f"{config.replica_id}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    argv = [
        sys.executable,
        "-c",
        "import sys; from replica_agent.cli import agent_main; sys.exit(agent_main())",
        "--config",
        str(path),
        "--log-level",
        "WARNING",
    ]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    managed = spawn(config.replica_id, argv, log_dir, cores, env)
    return AgentProcess(managed.name, managed.proc, managed.log_path, cores, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")


def wait_healthy(process: AgentProcess, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            with urllib.request.urlopen(process.http_url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} did not become healthy within {timeout:.0f} s (log: {process.log_path})")


@dataclass
class RouterProcess(ManagedProcess):
    url: str = ""
    replicas: dict[str, str] = field(default_factory=dict)


def start_router(replicas: dict[str, str], log_dir: Path, *, max_outstanding: int = 256, admin_token_file: Path | None = None) -> RouterProcess:
    """`collm-router` in front of `replicas` (name -> http url); health checks off (the harness owns the replicas)."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        "import sys; from replica_agent.router.app import main; sys.exit(main())",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--health-interval",
        "0",
        "--max-outstanding",
        str(max_outstanding),
        "--log-level",
        "WARNING",
    ]
    for name, url in replicas.items():
        argv += ["--replica", f"{name}={url}"]
    if admin_token_file is not None:
        argv += ["--admin-token-file", str(admin_token_file)]
    managed = spawn("router", argv, log_dir, None, {})
    router = RouterProcess(managed.name, managed.proc, managed.log_path, None, f"http://127.0.0.1:{port}", dict(replicas))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        router.check_alive()
        try:
            with urllib.request.urlopen(router.url + "/metrics", timeout=2):  # open to all (/admin/* may need the token)
                return router
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the router did not start within 60 s (log: {router.log_path})")
