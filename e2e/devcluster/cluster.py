"""DevCluster: the emulated API server + kubelet stand-in + (optionally) the kopf operator.

    with DevCluster(kubeconfig="dev.kubeconfig") as dc:
        subprocess.run(["kubectl", "--kubeconfig", dc.kubeconfig, "apply", "-f", "x.yaml"])

The API and the kubelet run on one asyncio loop in a background thread; the operator runs as a
``kopf run --standalone --all-namespaces -m MODULE`` subprocess with KUBECONFIG pointing at the
emulator (it is stopped before the emulator). ``main(argv)`` is ``python -m e2e.devcluster up``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .emulator import ApiEmulator, ApiError
from .kubelet import Kubelet

log = logging.getLogger(__name__)

DEFAULT_CRDS_DIR = Path(__file__).resolve().parents[2] / "crds"
DEFAULT_OPERATOR_MODULE = "collm_operator.main"
# The agents' model cache (operator/collm_operator/api.py CACHE_DIR) is an emptyDir in the pod spec:
# on the dev cluster every replica shares the user's cache instead of rebuilding the model.
DEFAULT_SHARED_MOUNTS = {"/var/cache/collm": str(Path.home() / ".cache" / "collm")}


def kubeconfig_text(server: str, namespace: str = "default") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "collm-dev", "cluster": {"server": server}}],
            "users": [{"name": "collm-dev", "user": {"token": "collm-dev-token"}}],
            "contexts": [{"name": "collm-dev", "context": {"cluster": "collm-dev", "user": "collm-dev", "namespace": namespace}}],
            "current-context": "collm-dev",
        },
        sort_keys=False,
    )


class DevCluster:
    """An emulated cluster: start() / stop(), or use it as a context manager."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        crds_dir: str | os.PathLike | None = DEFAULT_CRDS_DIR,
        kubelet: bool = True,
        operator: bool = False,
        operator_module: str = DEFAULT_OPERATOR_MODULE,
        operator_pythonpath: list[str] | None = None,
        operator_args: list[str] | None = None,
        workdir: str | os.PathLike | None = None,
        operator_log: str | os.PathLike | None = None,
        shared_mounts: dict[str, str] | None = None,
        stand_in: bool = False,
        faults_dir: str | os.PathLike | None = None,
    ):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="collm-devcluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = str(kubeconfig or self.workdir / "kubeconfig")
        self.port = port
        self.crds_dir = Path(crds_dir) if crds_dir else None
        self.with_kubelet = kubelet
        self.with_operator = operator
        self.operator_module = operator_module
        self.operator_pythonpath = operator_pythonpath or []
        self.operator_args = operator_args or []
        self.operator_log = Path(operator_log or self.workdir / "operator.log")
        self.shared_mounts = DEFAULT_SHARED_MOUNTS if shared_mounts is None else shared_mounts
        self.stand_in = stand_in  # the kubelet starts no container processes (see Kubelet)
        self.faults_dir = faults_dir  # arms the pods' fault hook (fault_hook.py; the chaos runner's)
        self.emulator: ApiEmulator | None = None
        self.kubelet: Kubelet | None = None
        self.operator_proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 30.0) -> DevCluster:
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="collm-devcluster", daemon=True)
        self._thread.start()
        self.url = ready.result(timeout_s)
        if self.crds_dir is not None and self.crds_dir.is_dir():
            self.install_crds(self.crds_dir)
        # Written once the API is up and the CRDs are in: its appearance means "ready".
        Path(self.kubeconfig).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(self.kubeconfig) + ".tmp")
        tmp.write_text(kubeconfig_text(self.url))
        tmp.replace(self.kubeconfig)
        if self.with_operator:
            self.start_operator()
        return self

    def _run_loop(self, ready: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            self._stop_event = asyncio.Event()
            self.emulator = ApiEmulator()
            try:
                url = await self.emulator.start(port=self.port)
                if self.with_kubelet:
                    self.kubelet = Kubelet(
                        self.emulator, self.workdir / "kubelet", shared_mounts=self.shared_mounts, stand_in=self.stand_in, faults_dir=self.faults_dir
                    )
                    await self.kubelet.start()
            except BaseException as e:  # noqa: BLE001
                ready.set_exception(e)
                raise
            ready.set_result(url)
            await self._stop_event.wait()
            if self.kubelet is not None:
                await self.kubelet.stop()
            await self.emulator.stop()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def stop(self) -> None:
        """Stop the operator first (it must see the API while it shuts down), then the node, then the API."""
        self.stop_operator()
        if self._loop is not None and self._stop_event is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(30)
        self._loop = None

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ operator

    def operator_available(self) -> bool:
        try:
            return importlib.util.find_spec(self.operator_module) is not None
        except (ImportError, ValueError):
            return False

    def start_operator(self) -> bool:
        """Start ``kopf run`` against the emulator; False (with a warning) when the module is absent."""
        if self.operator_proc is not None:
            return True
        found = any((Path(d) / (self.operator_module.replace(".", "/") + ".py")).exists() for d in self.operator_pythonpath) or self.operator_available()
        if not found:
            log.warning("operator module %s not found: running without the operator", self.operator_module)
            return False
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        if self.kubelet is not None:  # the operator resolves Service/pod DNS names like the pods do
            env.update(self.kubelet.dns_env())
        if self.operator_pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(self.operator_pythonpath + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "-m", self.operator_module, *self.operator_args]
        logf = open(self.operator_log, "ab")
        self.operator_proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        return True

    def stop_operator(self, grace_s: float = 15.0) -> None:
        proc, self.operator_proc = self.operator_proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    # ------------------------------------------------------------------ in-process access

    def call(self, fn: Callable[[ApiEmulator], Any], timeout_s: float = 10.0) -> Any:
        """Run ``fn(emulator)`` on the cluster's loop thread and return its result."""
        assert self._loop is not None and self.emulator is not None, "the cluster is not running"

        async def run() -> Any:
            return fn(self.emulator)  # type: ignore[arg-type]

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def apply_object(self, body: dict) -> dict:
        """Create or merge-patch one object (a minimal in-process ``kubectl apply``)."""

        def run(emu: ApiEmulator) -> dict:
            api_version, kind = body["apiVersion"], body["kind"]
            rt = emu.rt_by_kind(api_version, kind)
            meta = body.get("metadata") or {}
            try:
                emu.get_object(rt, meta.get("namespace") or "default", meta["name"])
            except ApiError:
                return emu.create_object(rt, body, meta.get("namespace"))
            return emu.patch_object(rt, meta.get("namespace") or "default", meta["name"], body)

        return self.call(run)

    def apply_manifest(self, path: str | os.PathLike) -> list[dict]:
        with open(path) as f:
            return [self.apply_object(doc) for doc in yaml.safe_load_all(f) if doc]

    def install_crds(self, folder: str | os.PathLike) -> list[str]:
        """Install every CustomResourceDefinition found in ``folder/*.yaml`` (other documents are skipped)."""
        names = []
        for path in sorted(Path(folder).glob("*.y*ml")):
            try:
                docs = list(yaml.safe_load_all(path.read_text()))
            except yaml.YAMLError as e:
                log.warning("skipping %s: %s", path, e)
                continue
            for doc in docs:
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    try:
                        names.append(self.apply_object(doc)["metadata"]["name"])
                    except (ApiError, KeyError) as e:
                        log.warning("could not install the CRD in %s: %s", path, e)
        return names

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = "default") -> dict | None:
        def run(emu: ApiEmulator) -> dict | None:
            try:
                return emu.get_object(emu.rt_by_kind(api_version, kind), namespace, name)
            except ApiError:
                return None

        return self.call(run)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    """``python -m e2e.devcluster up [--kubeconfig PATH] [--port N] [--no-operator] [--no-kubelet] [--crds DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m e2e.devcluster", description="an emulated Kubernetes cluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster and block until Ctrl-C")
    up.add_argument("--kubeconfig", default="collm-dev.kubeconfig", help="where to write the kubeconfig")
    up.add_argument("--port", type=int, default=None, help="API port (default: a free one)")
    up.add_argument("--no-operator", action="store_true", help="do not run the kopf operator")
    up.add_argument("--no-kubelet", action="store_true", help="do not run pods")
    up.add_argument("--crds", default=str(DEFAULT_CRDS_DIR), help="folder of CRD manifests to install")
    up.add_argument("--operator-module", default=DEFAULT_OPERATOR_MODULE)
    up.add_argument("--workdir", default=None, help="pod dirs and logs (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    dc = DevCluster(
        args.kubeconfig,
        port=args.port,
        crds_dir=args.crds,
        kubelet=not args.no_kubelet,
        operator=not args.no_operator,
        operator_module=args.operator_module,
        workdir=args.workdir,
    )
    dc.start()
    kubeconfig = os.path.abspath(dc.kubeconfig)
    print(
        f"dev cluster API at {dc.url}\n  export KUBECONFIG={kubeconfig}\n  kubectl get pods -o wide\n"
        f"operator: {'running (log: ' + str(dc.operator_log) + ')' if dc.operator_proc else 'not running'}\n"
        f"pod logs: {dc.workdir / 'kubelet' / 'logs'}\nCtrl-C stops it.",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C stops it even when it was started with SIGINT ignored (a shell's background job is).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reported = False
    try:
        while not stop.wait(0.5):
            proc = dc.operator_proc
            if proc is not None and proc.poll() is not None and not reported:
                reported = True
                tail = dc.operator_log.read_text(errors="replace")[-2000:] if dc.operator_log.exists() else ""
                print(f"the operator exited with code {proc.returncode} (the API keeps serving); log tail:\n{tail}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        dc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
