"""A whole CoLLM cluster on this machine: replica agents, the router, the controller.

Two ways to run the replicas:
- in one process (`processes=False`, the demo and tests): the in-process LocalCluster's agents (in_process.py)
  share one base model; each serves HTTP on its own loopback port. Cheap to start, but the
  replicas share the machine's cores, so they are not independent devices.
- one OS process per replica (`processes=True`, the goodput benchmark): each agent process owns
  CPU core(s) of its own (processes.py), as a GPU replica owns its GPU; the router is a process
  of its own too.

Either way the controller reaches the agents only over gRPC, and pushes routing weights to the
router with PUT /admin/weights, as the operator does. Every replica writes each adapter version it
publishes to `<workdir>/archive/<replica>` (the benchmark scores requests with them afterwards).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from collm_rpc import tls
from collm_rpc.client import AgentClient

from ..agent import Agent
from ..config import AgentConfig
from ..engine.data import stdlib_domain
from ..engine.model_host import BaseModel, load_base_model
from ..router.app import ReplicaEndpoint, create_router_app
from ..serving.background import BackgroundServer
from .controller import Controller, ControllerSettings
from .in_process import LOCAL_CLUSTER, LOCAL_NAMESPACE, LocalCluster
from .processes import AgentProcess, ManagedProcess, core_sets, start_agent, start_router, wait_healthy
from .throttle import Throttle, throttle_all

ADMIN_TOKEN_FILE = "admin-token"  # in the work folder: what the agents and the router read the admin token from


def _replica_tls_dir(ca: tls.CertificateAuthority, work: Path, replica_id: str) -> Path:
    """A replica process's TLS directory, laid out as the operator's Secret is mounted."""
    directory = work / "tls" / replica_id
    ca.issue(tls.Identity.replica(LOCAL_NAMESPACE, LOCAL_CLUSTER, replica_id)).write(directory, replica_id)
    return directory


# One domain per replica, each its private data (non-IID): Python code of one standard-library
# package, or English prose (Python's reference documentation); replica 0 is code, replica 1 prose.
DOMAINS = ("json", "prose", "http", "email", "logging", "urllib", "xml", "unittest")


def replica_configs(n: int, *, model: str = "tiny", ttft_ms: int = 1000, tpot_ms: int = 100, **overrides) -> list[AgentConfig]:
    if not 1 <= n <= len(DOMAINS):
        raise ValueError(f"replicas must be between 1 and {len(DOMAINS)} (one data domain each)")
    base = dict(model=model, port=0, grpc_port=0, ttft_ms=ttft_ms, tpot_ms=tpot_ms, max_total_tokens=512, eval_batches=2, revision_every_seconds=5.0)
    return [AgentConfig(**{**base, **overrides, "replica_id": f"replica-{i}", "data": str(stdlib_domain(DOMAINS[i]))}) for i in range(n)]


def put_weights(router_url: str, weights: dict[str, float], affinity: bool = True, *, token: str | None = None) -> None:
    body = json.dumps({"weights": weights, "affinity": affinity}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(router_url + "/admin/weights", data=body, method="PUT", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as reply:
        reply.read()


class BackgroundRouter:
    """The router's aiohttp app on its own event loop thread (in-process replicas)."""

    def __init__(self, endpoints: list[ReplicaEndpoint], host: str = "127.0.0.1", **settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="collm-router", daemon=True)
        self.thread.start()
        self.app = create_router_app(endpoints, **settings)

        async def start() -> web.AppRunner:
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            return runner

        self.runner = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.url = f"http://{host}:{self.runner.addresses[0][1]}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Replica:
    """One replica as the harness sees it: its endpoints, and the agent itself when it is in-process."""

    name: str
    http_url: str
    grpc_address: str
    config: AgentConfig
    agent: Agent | None = None
    process: AgentProcess | None = None


@dataclass
class LocalDeployment:
    replicas: dict[str, Replica]
    router_url: str
    controller: Controller | None
    workdir: Path
    processes: bool
    owns_workdir: bool = False  # a temporary folder made here: `cleanup()` removes it
    _stoppers: list[Callable[[], None]] = field(default_factory=list)
    _managed: list[ManagedProcess] = field(default_factory=list)
    arrivals: Callable[[], int] = lambda: 0  # requests sent so far: the controller's load signal (the traffic sets it)
    # What the harness presents as the operator: mutual TLS to the agents, the admin token to the router.
    credentials: tls.Credentials | None = None
    admin_token: str | None = None
    throttles: dict[str, Throttle] = field(default_factory=dict)  # replicas made slower devices (throttle.py)

    @classmethod
    def start(
        cls,
        configs: list[AgentConfig],
        settings: ControllerSettings | None,
        *,
        base: BaseModel | None = None,
        processes: bool = False,
        cores_per_replica: int = 1,
        workdir: str | Path | None = None,
        controller: bool = True,
        throttle: Mapping[str, float] | None = None,
    ) -> LocalDeployment:
        """Start the replicas, the router and (with `settings`) the controller; `workdir` gets the
        adapter archives and the processes' logs (default: a new temporary folder). `throttle`
        makes the named replicas slower devices: each may use that share of its core (processes only)."""
        if throttle and not processes:
            raise ValueError("throttling a replica needs replica processes (processes=True)")
        work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="collm-local-"))
        (work / "archive").mkdir(parents=True, exist_ok=True)
        # As the operator does: a CA, a certificate per replica and the operator's own, and an admin token.
        ca = tls.CertificateAuthority.create("collm-local-ca")
        token, token_file = secrets.token_urlsafe(32), work / ADMIN_TOKEN_FILE
        token_file.write_text(token)
        token_file.chmod(0o600)
        configs = [
            c.model_copy(
                update={
                    "adapter_archive": str(work / "archive" / c.replica_id),
                    "admin_token_file": str(token_file),
                    "tls_dir": str(_replica_tls_dir(ca, work, c.replica_id)) if processes else None,
                }
            )
            for c in configs
        ]
        deployment = cls({}, "", None, work, processes, owns_workdir=workdir is None)
        deployment.credentials = ca.issue(tls.Identity.operator())
        deployment.admin_token = token
        try:
            if processes:
                deployment._start_processes(configs, cores_per_replica)
                deployment.throttles = throttle_all({p.name: p.pid for p in deployment._managed}, throttle)
            else:
                deployment._start_in_process(configs, base, ca)
            if settings is not None and controller:
                addresses = {n: r.grpc_address for n, r in deployment.replicas.items()}
                deployment.controller = Controller(
                    addresses,
                    set_weights=deployment.set_weights,
                    arrivals=lambda: deployment.arrivals(),
                    settings=settings,
                    credentials=deployment.credentials,
                ).start()
            return deployment
        except BaseException:
            deployment.stop()
            raise

    def _start_in_process(self, configs: list[AgentConfig], base: BaseModel | None, ca: tls.CertificateAuthority) -> None:
        base = base or load_base_model(configs[0].model)
        cluster = LocalCluster(configs, base=base, ca=ca)
        self._stoppers.append(cluster.stop)
        for name, r in cluster.replicas.items():
            server = BackgroundServer(r.agent, "127.0.0.1", 0)
            self._stoppers.append(server.stop)
            config = next(c for c in configs if c.replica_id == name)
            self.replicas[name] = Replica(name, server.url, r.address, config, agent=r.agent)
        # Health checks off: the agents live in this process; the controller's weights drain a replica.
        router = BackgroundRouter(
            [ReplicaEndpoint(n, r.http_url) for n, r in self.replicas.items()],
            health_interval_s=0,
            max_outstanding_per_replica=256,
            admin_token=self.admin_token,
        )
        self._stoppers.append(router.stop)
        self.router_url = router.url

    def _start_processes(self, configs: list[AgentConfig], cores_per_replica: int) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        cores = core_sets(len(configs), cores_per_replica)
        started = []
        for config, cpus in zip(configs, cores):
            process = start_agent(config, logs, cpus)
            self._managed.append(process)
            started.append((config, process))
        for config, process in started:
            wait_healthy(process)
            self.replicas[config.replica_id] = Replica(config.replica_id, process.http_url, process.grpc_address, config, process=process)
        router = start_router({n: r.http_url for n, r in self.replicas.items()}, logs, admin_token_file=self.workdir / ADMIN_TOKEN_FILE)
        self._managed.append(router)
        self.router_url = router.url

    # -- acting -------------------------------------------------------------------------------
    def set_weights(self, weights: dict[str, float], affinity: bool = True) -> None:
        put_weights(self.router_url, weights, affinity, token=self.admin_token)

    def client(self, name: str, *, timeout: float = 30.0) -> AgentClient:
        """A gRPC client of one replica, presenting the operator's certificate as the harness does."""
        return AgentClient(self.replicas[name].grpc_address, timeout=timeout, credentials=self.credentials)

    def archives(self) -> list[Path]:
        return [Path(r.config.adapter_archive) for r in self.replicas.values() if r.config.adapter_archive]

    def managed_processes(self) -> dict[str, ManagedProcess]:
        """The agent and router processes by name (processes mode; empty in-process)."""
        return {p.name: p for p in self._managed}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each process of the deployment (processes mode only)."""
        return {p.name: p.cpu_seconds() for p in self._managed}

    def cleanup(self) -> None:
        """Remove the temporary work folder (archives, logs) once nothing needs it any more."""
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        for t in self.throttles.values():
            t.release()
        for stop in reversed(self._stoppers):
            stop()
        self._stoppers.clear()
        for process in reversed(self._managed):
            process.stop()
