"""A stand-in for the kubelet of the dev cluster (and, through workloads.py, for the StatefulSet
and Deployment controllers).

Runs on the emulator's asyncio loop and works on its store directly:
- workloads.py: StatefulSets get pods ``<name>-0..N-1`` (scaled with ``spec.replicas``); Deployments
  get pods ``<name>-<i>``; both are owned by their workload (so deleting it deletes them), a changed
  pod template rolls them one at a time, and their status counts replicas and ready replicas.
- Every pod's containers run as REAL local processes (command + args + env), each pod on its own
  loopback address 127.0.0.<n> (n >= 2; all of 127/8 is local on Linux): ``--host`` in the args is
  replaced by that address or added when absent. emptyDir and configMap volumes become temp dirs and
  their mount paths are rewritten in args/env/workingDir. A command that is a console script name is
  resolved from the virtualenv's bin dir, ``python``/``python3`` to the running interpreter.
- Pod status: phase Running, podIP, containerStatuses, conditions Ready=True once the readiness probe
  (httpGet or tcpSocket; none = ready when running) succeeds; a dead process is restarted with
  restartCount+1 (restartPolicy Always, with a small backoff); deleted pods have their processes killed.
- Cluster DNS for Python processes: Service and pod names -> pod addresses in a JSON file, resolved by
  the sitecustomize hook of ``dns_hook.py`` on the PYTHONPATH of pods and of the operator.
- Faults (only with ``faults_dir``, for the chaos runner): pods get COLLM_DEVCLUSTER_FAULTS, and the
  sitecustomize hook loads ``fault_hook.py``, which fires faults the runner arms per pod in that folder.
Not emulated: image pulls, resource limits, DNS for processes that are not Python.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from .emulator import ApiEmulator, ApiError, now_iso
from .workloads import POD_RT, pod_ready, reconcile_workloads

log = logging.getLogger(__name__)
Obj = dict[str, Any]

NO_HOST_FLAG_ANNOTATION = "devcluster.collm.io/no-host-flag"

# The cluster DNS hook (dns_hook.py), written as <workdir>/dns_hook/sitecustomize.py and put on the
# PYTHONPATH of pods and of the operator. Read as text, never imported: importing it would patch
# socket.getaddrinfo in this process.
DNS_HOOK_SOURCE = Path(__file__).with_name("dns_hook.py").read_text(encoding="utf-8")
# The fault hook, written beside it as <workdir>/dns_hook/collm_devcluster_faults.py (same reason).
FAULT_HOOK_SOURCE = Path(__file__).with_name("fault_hook.py").read_text(encoding="utf-8")
FAULTS_ENV = "COLLM_DEVCLUSTER_FAULTS"


class _Container:
    def __init__(self, name: str):
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at: str | None = None
        self.next_start = 0.0
        self.ready = False
        self.last_exit: int | None = None
        self.error: str | None = None


class _Pod:
    def __init__(self, uid: str, ip: str, root: Path):
        self.uid, self.ip, self.root = uid, ip, root
        self.containers: dict[str, _Container] = {}


class Kubelet:
    def __init__(
        self,
        emulator: ApiEmulator,
        workdir: str | os.PathLike | None = None,
        poll_s: float = 0.3,
        node_name: str = "devcluster",
        shared_mounts: dict[str, str] | None = None,
        stand_in: bool = False,
        faults_dir: str | os.PathLike | None = None,
    ):
        self.emu = emulator
        # stand_in: pods get an address and turn Running and Ready at once, but no process starts
        # (scale tests serve their "agents" from one stand-in server; collm bench operator-scale).
        self.stand_in = stand_in
        # mountPath -> host directory shared by every pod that mounts that path (e.g. a model cache,
        # so that each replica does not rebuild or download the model into its own emptyDir).
        self.shared_mounts = dict(shared_mounts or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="collm-devcluster-"))
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self.node_name = node_name
        self.pods: dict[tuple[str, str], _Pod] = {}
        self._ips_used: set[int] = set()
        self._reapers: list[threading.Thread] = []
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self.bin_dirs = [Path(sys.executable).parent, Path(sys.prefix) / "bin"]
        # Cluster DNS: a name -> {ip, ports} map that the sitecustomize hook reads in every pod.
        self.dns_path = self.workdir / "dns.json"
        self.dns_hook_dir = self.workdir / "dns_hook"
        self.dns_hook_dir.mkdir(parents=True, exist_ok=True)
        (self.dns_hook_dir / "sitecustomize.py").write_text(DNS_HOOK_SOURCE)
        self.faults_dir = Path(faults_dir) if faults_dir else None
        if self.faults_dir is not None:
            self.faults_dir.mkdir(parents=True, exist_ok=True)
            (self.dns_hook_dir / "collm_devcluster_faults.py").write_text(FAULT_HOOK_SOURCE)
        self._dns: dict[str, Any] = {}
        self._write_dns({})

    def dns_env(self) -> dict[str, str]:
        """Environment additions that give a Python process the cluster DNS (pods and the operator)."""
        pythonpath = os.pathsep.join(x for x in (str(self.dns_hook_dir), os.environ.get("PYTHONPATH", "")) if x)
        return {"COLLM_DEVCLUSTER_DNS": str(self.dns_path), "PYTHONPATH": pythonpath}

    def _write_dns(self, mapping: dict[str, Any]) -> None:
        if mapping == self._dns and self.dns_path.exists():
            return
        tmp = self.dns_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mapping, sort_keys=True))
        tmp.replace(self.dns_path)
        self._dns = mapping

    def update_dns(self) -> None:
        emu = self.emu
        mapping: dict[str, Any] = {}
        pods = [
            p
            for p in emu.list_objects(emu.types[POD_RT])
            if (p["metadata"]["namespace"], p["metadata"]["name"]) in self.pods and not p["metadata"].get("deletionTimestamp")
        ]

        def names(base: str) -> list[str]:
            return [base + ".svc", base + ".svc.cluster.local"]

        for p in pods:
            spec, meta = p.get("spec") or {}, p["metadata"]
            ip = self.pods[(meta["namespace"], meta["name"])].ip
            if spec.get("hostname") and spec.get("subdomain"):
                for n in names(f"{spec['hostname']}.{spec['subdomain']}.{meta['namespace']}"):
                    mapping[n] = {"ip": ip}
        # Pods by (namespace, label, value): a Service's members come from its rarest label, not from
        # every pod in turn (at 100 clusters, services x pods took 30 ms of the API's loop a pass).
        labelled: dict[tuple[str, str, str], list[Obj]] = {}
        for p in pods:
            for k, v in (p["metadata"].get("labels") or {}).items():
                labelled.setdefault((p["metadata"]["namespace"], k, v), []).append(p)
        for svc in emu.list_objects(emu.types[("", "v1", "services")]):
            meta, spec = svc["metadata"], svc.get("spec") or {}
            selector = spec.get("selector") or {}
            if not selector:
                continue
            fewest = min((labelled.get((meta["namespace"], k, v), []) for k, v in selector.items()), key=len)
            members = [p for p in fewest if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
            members.sort(key=lambda p: (not pod_ready(p), p["metadata"]["name"]))
            if not members:
                continue
            target = members[0]
            ip = self.pods[(target["metadata"]["namespace"], target["metadata"]["name"])].ip
            ports: dict[str, int] = {}
            cports = {cp.get("name"): cp.get("containerPort") for c in (target.get("spec") or {}).get("containers") or [] for cp in c.get("ports") or []}
            for sp in spec.get("ports") or []:
                tp = sp.get("targetPort", sp.get("port"))
                tp = cports.get(tp, tp) if isinstance(tp, str) and not tp.isdigit() else tp
                if tp is not None and str(tp) != str(sp.get("port")):
                    ports[str(sp.get("port"))] = int(tp)
            base = f"{meta['name']}.{meta['namespace']}"
            for n in names(base) + [base]:
                mapping.setdefault(n, {"ip": ip, "ports": ports})
        self._write_dns(mapping)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        self.emu.pod_log_reader = self.read_log  # type: ignore[attr-defined]
        node_rt = self.emu.types[("", "v1", "nodes")]
        try:
            self.emu.get_object(node_rt, None, self.node_name)
        except ApiError:
            cpus = str(os.cpu_count() or 1)
            self.emu.create_object(
                node_rt, {"metadata": {"name": self.node_name, "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux"}}}
            )
            self.emu.patch_object(
                node_rt,
                None,
                self.node_name,
                {
                    "status": {
                        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "lastTransitionTime": now_iso()}],
                        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node_name}],
                        "capacity": {"cpu": cpus, "pods": "250"},
                        "allocatable": {"cpu": cpus, "pods": "250"},
                        "nodeInfo": {
                            "kubeletVersion": "v1.31.0-collm-devcluster",
                            "operatingSystem": "linux",
                            "architecture": "amd64",
                            "containerRuntimeVersion": "local-processes",
                        },
                    }
                },
                subresource="status",
            )
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for key in list(self.pods):
            self._kill_pod(key)
        for t in self._reapers:
            await asyncio.get_running_loop().run_in_executor(None, t.join, 10)
        if self._session:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            try:
                reconcile_workloads(self.emu)
                await self.reconcile_pods()
                self.update_dns()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  keep the node alive whatever happens
                log.exception("kubelet pass failed")
            await asyncio.sleep(self.poll_s)

    # ------------------------------------------------------------------ controllers

    # ------------------------------------------------------------------ pods

    async def reconcile_pods(self) -> None:
        emu = self.emu
        pod_rt = emu.types[POD_RT]
        seen = set()
        for pod in list(emu.list_objects(pod_rt)):
            meta = pod["metadata"]
            key = (meta["namespace"], meta["name"])
            if meta.get("deletionTimestamp"):
                self._kill_pod(key)
                continue
            seen.add(key)
            state = self.pods.get(key)
            if state is not None and state.uid != meta["uid"]:
                self._kill_pod(key)
                state = None
            if state is None:
                state = self._admit(pod)
            await self._sync_pod(pod, state)
        for key in list(self.pods):
            if key not in seen:
                self._kill_pod(key)

    def _allocate_ip(self) -> str:
        """A free loopback address (all of 127/8 reaches the loopback device): 127.0.0.2 up, then
        127.0.1.1 and so on, skipping the .0 and .255 ends."""
        n = 2
        while n in self._ips_used or n % 256 in (0, 255):
            n += 1
        if n >= 256 * 256:
            raise RuntimeError("no free loopback address for a pod")
        self._ips_used.add(n)
        return f"127.0.{n // 256}.{n % 256}"

    def _admit(self, pod: Obj) -> _Pod:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        root = self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        root.mkdir(parents=True, exist_ok=True)
        state = _Pod(meta["uid"], self._allocate_ip(), root)
        for c in (pod.get("spec") or {}).get("containers") or []:
            state.containers[c["name"]] = _Container(c["name"])
        self.pods[key] = state
        return state

    def _kill_pod(self, key: tuple[str, str]) -> None:
        state = self.pods.pop(key, None)
        if state is None:
            return
        procs = [c.proc for c in state.containers.values() if c.proc is not None and c.proc.poll() is None]
        third, fourth = (int(x) for x in state.ip.split(".")[2:])
        ip_n = third * 256 + fourth

        def reap() -> None:  # off the loop; the address is reused only once its processes are gone
            for proc in procs:
                _terminate(proc)
            self._ips_used.discard(ip_n)

        t = threading.Thread(target=reap, name=f"reap-{key[1]}", daemon=True)
        t.start()
        self._reapers = [r for r in self._reapers if r.is_alive()] + [t]

    def _volumes(self, pod: Obj, state: _Pod) -> dict[str, Path]:
        """Volume name -> a local directory (emptyDir, configMap, secret, a claim's own directory; others: an empty dir)."""
        out: dict[str, Path] = {}
        ns = pod["metadata"]["namespace"]
        for vol in (pod.get("spec") or {}).get("volumes") or []:
            if "hostPath" in vol:
                out[vol["name"]] = Path(vol["hostPath"].get("path", "/"))
                continue
            if "persistentVolumeClaim" in vol:  # outlives the pod: one directory per claim
                claim = self.workdir / "claims" / f"{ns}_{vol['persistentVolumeClaim']['claimName']}"
                claim.mkdir(parents=True, exist_ok=True)
                out[vol["name"]] = claim
                continue
            path = state.root / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            for source, rt_key, field in (("configMap", ("", "v1", "configmaps"), "name"), ("secret", ("", "v1", "secrets"), "secretName")):
                if source in vol:
                    try:
                        obj = self.emu.get_object(self.emu.types[rt_key], ns, vol[source].get(field))
                    except ApiError:
                        continue
                    import base64

                    for k, v in (obj.get("data") or {}).items():
                        (path / k).write_bytes(base64.b64decode(v) if source == "secret" else str(v).encode())
                    for k, v in (obj.get("stringData") or {}).items():
                        (path / k).write_text(str(v))
            out[vol["name"]] = path
        return out

    def _env(self, pod: Obj, container: Obj, state: _Pod) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        env.update(self.dns_env())
        if self.faults_dir is not None:
            env[FAULTS_ENV] = str(self.faults_dir)
        env["HOSTNAME"] = (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]
        meta = pod["metadata"]
        ns = meta["namespace"]
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            src = e.get("valueFrom") or {}
            value: str | None = None
            if "fieldRef" in src:
                fp = src["fieldRef"].get("fieldPath", "")
                value = {
                    "metadata.name": meta["name"],
                    "metadata.namespace": ns,
                    "metadata.uid": meta["uid"],
                    "status.podIP": state.ip,
                    "status.hostIP": "127.0.0.1",
                    "spec.nodeName": self.node_name,
                    "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
                }.get(fp)
                if value is None and fp.startswith("metadata.labels['"):
                    value = (meta.get("labels") or {}).get(fp[len("metadata.labels['") : -2])
                if value is None and fp.startswith("metadata.annotations['"):
                    value = (meta.get("annotations") or {}).get(fp[len("metadata.annotations['") : -2])
            for ref, rt_key in (("configMapKeyRef", ("", "v1", "configmaps")), ("secretKeyRef", ("", "v1", "secrets"))):
                if ref in src:
                    try:
                        obj = self.emu.get_object(self.emu.types[rt_key], ns, src[ref]["name"])
                        raw = (obj.get("data") or {}).get(src[ref]["key"])
                        if raw is not None and ref == "secretKeyRef":
                            import base64

                            raw = base64.b64decode(raw).decode()
                        value = raw if raw is not None else (obj.get("stringData") or {}).get(src[ref]["key"])
                    except ApiError:
                        value = None
            if value is not None:
                env[e["name"]] = value
        return env

    def _resolve(self, exe: str) -> str:
        if exe in ("python", "python3"):
            return sys.executable
        if os.sep in exe:
            return exe
        for d in self.bin_dirs:
            if (d / exe).exists():
                return str(d / exe)
        return shutil.which(exe) or exe

    def _argv(self, pod: Obj, container: Obj, state: _Pod, mounts: dict[str, Path]) -> list[str] | None:
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if not container.get("command"):
            return None
        argv = [_rewrite(a, mounts) for a in argv]
        argv[0] = self._resolve(argv[0])
        if (pod["metadata"].get("annotations") or {}).get(NO_HOST_FLAG_ANNOTATION) != "true":
            if "--host" in argv[1:]:
                i = argv.index("--host", 1)
                if i + 1 < len(argv):
                    argv[i + 1] = state.ip
            elif any(a.startswith("--host=") for a in argv[1:]):
                argv = [f"--host={state.ip}" if a.startswith("--host=") else a for a in argv]
            else:
                argv += ["--host", state.ip]
        return argv

    def _start(self, pod: Obj, container: Obj, state: _Pod, c: _Container) -> None:
        vols = self._volumes(pod, state)
        mounts = {m["mountPath"]: vols[m["name"]] for m in container.get("volumeMounts") or [] if m["name"] in vols}
        for m in container.get("volumeMounts") or []:
            if m["mountPath"] in self.shared_mounts:
                shared = Path(self.shared_mounts[m["mountPath"]]).expanduser()
                shared.mkdir(parents=True, exist_ok=True)
                mounts[m["mountPath"]] = shared
        argv = self._argv(pod, container, state, mounts)
        if argv is None:
            c.error = "no command: the dev cluster cannot run an image's default entrypoint"
            return
        # Only the container's own env names paths inside the pod; the node's (its PATH, the DNS
        # hook on PYTHONPATH) must stay as they are even when they fall under a mount like /tmp.
        declared = {e["name"] for e in container.get("env") or []}
        env = {k: _rewrite(v, mounts) if k in declared else v for k, v in self._env(pod, container, state).items()}
        cwd = _rewrite(container.get("workingDir") or "", mounts) or str(state.root)
        if not os.path.isdir(cwd):
            cwd = str(state.root)
        logf = open(self.log_path(pod["metadata"]["namespace"], pod["metadata"]["name"], c.name), "ab")
        try:
            c.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            c.started_at, c.ready, c.error = now_iso(), False, None
        except OSError as e:
            c.proc, c.error = None, f"cannot start {argv[0]}: {e}"
        finally:
            logf.close()

    def log_path(self, namespace: str, name: str, container: str) -> Path:
        return self.workdir / "logs" / f"{namespace}_{name}_{container}.log"

    def read_log(self, namespace: str, name: str, container: str | None) -> str:
        state = self.pods.get((namespace, name))
        if container is None and state is not None and state.containers:
            container = next(iter(state.containers))
        path = self.log_path(namespace, name, container or "")
        return path.read_text(errors="replace") if path.exists() else ""

    async def _probe(self, container: Obj, ip: str) -> bool:
        probe = container.get("readinessProbe") or {}
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        if "httpGet" in probe:
            hg = probe["httpGet"]
            port = hg.get("port")
            port = ports.get(port, port) if isinstance(port, str) and not port.isdigit() else port
            url = f"http://{ip}:{port}{hg.get('path', '/')}"
            try:
                assert self._session is not None
                async with self._session.get(url) as resp:
                    return 200 <= resp.status < 400
            except Exception:  # noqa: BLE001
                return False
        if "tcpSocket" in probe:
            port = probe["tcpSocket"].get("port")
            port = ports.get(port, port) if isinstance(port, str) and not port.isdigit() else port
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(ip, int(port)), 1.0)
                w.close()
                return True
            except Exception:  # noqa: BLE001
                return False
        return True

    async def _sync_pod(self, pod: Obj, state: _Pod) -> None:
        spec = pod.get("spec") or {}
        now = time.monotonic()
        statuses = []
        for container in spec.get("containers") or []:
            c = state.containers.setdefault(container["name"], _Container(container["name"]))
            if self.stand_in:
                c.started_at = c.started_at or now_iso()
                statuses.append(
                    {
                        "name": c.name,
                        "image": container.get("image", ""),
                        "ready": True,
                        "restartCount": 0,
                        "started": True,
                        "state": {"running": {"startedAt": c.started_at}},
                    }
                )
                continue
            if c.proc is not None and c.proc.poll() is not None:
                c.last_exit = c.proc.returncode
                c.proc, c.ready = None, False
                c.restarts += 1
                c.next_start = now + min(10.0, 0.5 * 2 ** min(c.restarts, 5))
            if c.proc is None and c.error is None and now >= c.next_start:
                if c.restarts == 0 or spec.get("restartPolicy", "Always") != "Never":
                    self._start(pod, container, state, c)
            if c.proc is not None:
                c.ready = await self._probe(container, state.ip)
            cs: Obj = {"name": c.name, "image": container.get("image", ""), "ready": c.ready, "restartCount": c.restarts, "started": c.proc is not None}
            if c.proc is not None:
                cs["state"] = {"running": {"startedAt": c.started_at}}
            elif c.error:
                cs["state"] = {"waiting": {"reason": "CreateContainerError", "message": c.error}}
            else:
                cs["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
            if c.last_exit is not None:
                cs["lastState"] = {"terminated": {"exitCode": c.last_exit}}
            statuses.append(cs)
        running = any(s.get("state", {}).get("running") for s in statuses)
        ready = bool(statuses) and all(s["ready"] for s in statuses)
        old = pod.get("status") or {}
        old_conds = {c.get("type"): c for c in old.get("conditions") or []}

        def cond(t: str, ok: bool) -> Obj:
            value = "True" if ok else "False"
            prev = old_conds.get(t)
            ts = prev.get("lastTransitionTime") if prev and prev.get("status") == value else now_iso()
            return {"type": t, "status": value, "lastTransitionTime": ts}

        status = {
            "phase": "Running" if running else "Pending",
            "podIP": state.ip,
            "podIPs": [{"ip": state.ip}],
            "hostIP": "127.0.0.1",
            "startTime": old.get("startTime") or now_iso(),
            "conditions": [cond("PodScheduled", True), cond("Initialized", True), cond("ContainersReady", ready), cond("Ready", ready)],
            "containerStatuses": statuses,
        }
        new_spec_node = spec.get("nodeName")
        if status != old or new_spec_node != self.node_name:
            body = copy.deepcopy(pod)
            body["status"] = status
            try:
                if new_spec_node != self.node_name:
                    self.emu.patch_object(self.emu.types[POD_RT], pod["metadata"]["namespace"], pod["metadata"]["name"], {"spec": {"nodeName": self.node_name}})
                self.emu.patch_object(self.emu.types[POD_RT], pod["metadata"]["namespace"], pod["metadata"]["name"], {"status": status}, subresource="status")
            except ApiError:
                pass


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(local) + value[len(mount.rstrip("/")) :]
        if "=" in value:  # --flag=/mount/path
            flag, _, rest = value.partition("=")
            if rest == mount or rest.startswith(mount.rstrip("/") + "/"):
                return f"{flag}={local}{rest[len(mount.rstrip('/')) :]}"
    return value


def _terminate(proc: subprocess.Popen | None, grace_s: float = 3.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(2)
