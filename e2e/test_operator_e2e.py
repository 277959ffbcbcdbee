"""The operator end to end: kubectl against the emulated cluster (or a real one, see harness.py),
the real kopf operator, agents running as processes, rounds over gRPC.

The scenarios share one cluster and run in file order (each one starts from where the previous
left the cluster): apply the example -> Ready with an adapter; rounds publish; an SLO change
reaches the agents without a restart; scale 2 -> 3; a killed agent comes back with the adapter;
an operator restart mid-round finishes the round once; invalid resources get a clear condition;
every pod killed at once with the operator stopped comes back serving the same adapter; delete
removes every child and the finalizer.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import time
import urllib.error
import urllib.request

import grpc
import pytest

from .harness import DevHarness, Harness, RealHarness, condition, write_training_data
from .harness import example_cluster as cluster

NAME = "tiny"
CHILDREN = ("statefulset", "deployment", "service", "configmap", "poddisruptionbudget", "serviceaccount", "secret")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def h(tmp_path_factory, tiny_model_dir):
    kubeconfig = os.environ.get("COLLM_E2E_KUBECONFIG")
    if kubeconfig:
        harness: Harness = RealHarness(kubeconfig)
    else:
        harness = DevHarness(tmp_path_factory.mktemp("devcluster"), write_training_data(tmp_path_factory.mktemp("data")))
    try:
        yield harness
    finally:
        harness.kubectl("delete", "collmcluster", "--all", "--wait=false", check=False)
        harness.close()


def current(h: Harness) -> dict:
    return h.get("collmcluster", NAME)


def all_serve_current(h: Harness, replicas: int) -> bool:
    """Every agent rests on the cluster's global adapter, or on a newer one a round is publishing right
    now (rounds follow each other quickly here: the agents train continuously), and serves that
    global or a local revision on top of it."""
    obj = current(h)
    adapter = (obj.get("status") or {}).get("adapter") or {}
    if not adapter.get("sha256") or condition(obj, "Ready").get("status") != "True":
        return False
    stats = [h.agent_stats(f"{NAME}-{i}") for i in range(replicas)]
    rests_on = [st["global_adapter"] for st in stats]
    on_current = all(g["sha256"] == adapter["sha256"] or g["cluster_version"] > int(adapter.get("version") or 0) for g in rests_on)
    return on_current and all(st["adapter"]["cluster_version"] == st["global_adapter"]["cluster_version"] for st in stats)


def succeeded_rounds(h: Harness) -> list[dict]:
    return [r for r in h.get("adapterround", selector=f"collm.io/cluster={NAME}") if condition(r, "Succeeded").get("status") == "True"]


def test_apply_the_example_reaches_ready_with_an_adapter(h):
    h.apply(cluster(h))
    h.kubectl("wait", "--for=condition=Ready", f"collmcluster/{NAME}", "--timeout=180s", timeout=200)
    obj = current(h)
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["readyReplicas"] == 2 and len(status["adapter"]["sha256"]) == 64
    assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded", "TrainingActive"}
    for c in status["conditions"]:
        assert c["observedGeneration"] == obj["metadata"]["generation"] and c["lastTransitionTime"] and c["reason"]
    h.wait_for(lambda: all_serve_current(h, 2), 60, "both agents serving the cluster's adapter")
    # kubectl shows the printer columns and the children carry the owner reference.
    table = h.kubectl("get", "collmcluster", NAME, "-o", "wide").stdout
    assert "READY" in table.splitlines()[0] and "ADAPTER" in table.splitlines()[0] and "True" in table
    for kind in CHILDREN:
        items = h.get(kind, selector=f"app.kubernetes.io/instance={NAME}")
        assert items and all(i["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"] for i in items), kind
    assert "collm.io/finalizer" in obj["metadata"]["finalizers"]
    assert "Normal" in h.kubectl("describe", "collmcluster", NAME).stdout


def _secret(h: Harness, name: str, namespace: str | None = None) -> dict[str, bytes]:
    args = ["get", "secret", name, "-o", "json"] + (["-n", namespace] if namespace else [])
    return {k: base64.b64decode(v) for k, v in json.loads(h.kubectl(*args).stdout)["data"].items()}


def test_agents_take_control_from_the_operator_only_and_admin_routes_need_the_token(h):
    """Before mutual TLS anyone who reached a pod could Publish, ApplyPlan or Rollback."""
    from collm_rpc import tls
    from collm_rpc.client import AgentClient

    pod = f"{NAME}-0"
    address = f"{h.get('pod', pod)['status']['podIP']}:9090"
    issued = _secret(h, f"{NAME}-tls")
    assert {f"{NAME}-0.crt", f"{NAME}-1.key", "ca.crt"} <= set(issued)
    sibling = tls.Credentials(issued["ca.crt"], issued[f"{NAME}-1.crt"], issued[f"{NAME}-1.key"])
    with AgentClient(address, timeout=10) as plaintext, pytest.raises(grpc.RpcError) as refused:
        plaintext.stats()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS handshake, nothing served
    with AgentClient(address, timeout=10, credentials=sibling) as peer:
        with pytest.raises(grpc.RpcError) as denied:
            peer.apply_plan(0, 1, 1)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "operator" in (denied.value.details() or "")
    ca = _secret(h, "collm-ca", os.environ.get("COLLM_E2E_OPERATOR_NAMESPACE", "default"))
    operator = tls.CertificateAuthority(ca["tls.crt"], ca["tls.key"]).issue(tls.Identity.operator())
    with AgentClient(address, timeout=10, credentials=operator) as client:
        assert client.stats().replica_id == pod

    ip = h.get("pod", pod)["status"]["podIP"]
    request = urllib.request.Request(f"http://{ip}:8080/publish", b"{}", {"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        urllib.request.urlopen(request, timeout=10)
    assert unauthorized.value.code == 401


def test_rounds_publish_and_history_is_pruned(h):
    rounds = h.wait_for(lambda: len(succeeded_rounds(h)) >= 2 and succeeded_rounds(h), 180, "two published rounds")
    for r in rounds:
        s = r["status"]
        assert r["metadata"]["ownerReferences"][0]["name"] == NAME  # scheduled: owned by the cluster
        for type_ in ("Trained", "Aggregated", "Evaluated", "Published", "Succeeded"):
            assert condition(r, type_)["status"] == "True", (type_, s["conditions"])
        assert s["version"] >= 1 and len(s["sha256"]) == 64 and s["bytesTransferred"] > 0
        assert float(s["evalLossAfter"]) <= float(s["evalLossBefore"]) + 0.2
        assert {p["outcome"] for p in s["participants"]} == {"Accepted"} and all(p["bytes"] > 0 for p in s["participants"])
        assert float(s["timings"]["total"]) > 0
    h.wait_for(lambda: all_serve_current(h, 2), 60, "agents serving the published adapter")
    assert current(h)["status"]["adapter"]["version"] >= 2
    # roundHistoryLimit 2: older finished scheduled rounds are deleted.
    h.wait_for(lambda: current(h)["status"].get("roundsCreated", 0) >= 4, 120, "a fourth scheduled round")
    h.wait_for(
        lambda: (
            len([r for r in h.get("adapterround", selector=f"collm.io/cluster={NAME}") if condition(r, "Succeeded").get("status") in ("True", "False")]) <= 2
        ),
        30,
        "pruned history",
    )


def test_an_slo_change_reaches_the_agents_without_a_restart(h):
    pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in h.get("pod", selector=f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=agent")}
    h.kubectl("patch", "collmcluster", NAME, "--type", "merge", "-p", '{"spec": {"serving": {"ttftMilliseconds": 777, "tpotMilliseconds": 77}}}')
    h.wait_for(lambda: all((h.agent_stats(p)["ttft_ms"], h.agent_stats(p)["tpot_ms"]) == (777, 77) for p in pods), 30, "the new SLO on every agent")
    after = {p["metadata"]["name"]: p["metadata"]["uid"] for p in h.get("pod", selector=f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=agent")}
    assert after == pods  # the same pods: a plan carried it, nothing restarted
    assert "ttft_ms: 777" in h.get("configmap", f"{NAME}-agent-settings")["data"]["agent.yaml"]  # new pods start with it


def test_scale_to_three_and_the_new_replica_serves_the_current_adapter(h):
    h.kubectl("patch", "collmcluster", NAME, "--type", "merge", "-p", '{"spec": {"replicas": 3}}')
    h.wait_for(lambda: current(h)["status"].get("readyReplicas") == 3, 180, "three ready replicas")
    h.wait_for(lambda: all_serve_current(h, 3), 90, "tiny-2 serving the cluster's adapter")
    assert h.agent_stats(f"{NAME}-2")["global_adapter"]["cluster_version"] >= 1  # a round's adapter, not the initial one
    assert f"{NAME}-2" in h.get("deployment", f"{NAME}-router")["spec"]["template"]["spec"]["containers"][0]["args"][-1]


def test_a_killed_agent_that_lost_its_state_gets_the_adapter_back_from_the_operator(h):
    # No scheduled rounds from here on: only the operator's re-publishing can bring the adapter back.
    h.kubectl("patch", "collmcluster", NAME, "--type", "merge", "-p", '{"spec": {"federation": {"roundIntervalSeconds": 3600, "deadlineSeconds": 120}}}')
    h.wait_for(
        lambda: (
            not [
                r
                for r in h.get("adapterround", selector=f"collm.io/cluster={NAME}")
                if not condition(r, "Succeeded") or condition(r, "Succeeded")["status"] == "Unknown"
            ]
        ),
        120,
        "no round running",
    )
    victim = f"{NAME}-1"
    restarts = sum(c["restartCount"] for c in h.get("pod", victim)["status"]["containerStatuses"])
    h.wipe_state(victim)  # its volume lost: it starts on the initial adapter and the operator re-publishes
    h.kill_agent(victim)
    h.wait_for(
        lambda: (
            condition(current(h), "Ready").get("status") == "False"
            or sum(c["restartCount"] for c in h.get("pod", victim)["status"]["containerStatuses"]) > restarts
        ),
        60,
        "the agent seen dead",
    )
    h.wait_for(lambda: all_serve_current(h, 3), 180, f"{victim} back with the cluster's adapter")
    assert h.agent_stats(victim)["global_adapter"]["cluster_version"] >= 1
    events = h.kubectl("get", "events", "--field-selector", f"involvedObject.name={NAME}", "-o", "yaml").stdout
    assert "AdapterRestored" in events


def test_an_operator_restart_during_a_round_finishes_it_once(h):
    # One hand-made round, long enough to restart the operator in (no scheduled ones since the last test).
    participants = [f"{NAME}-0", f"{NAME}-1"]
    # Agents train all the time and a round uploads what they learnt since the last global adapter
    # as soon as it holds localSteps steps: ask for about 15 s more than they have now, so the round
    # is still training when the operator stops.
    first = {p: h.agent_stats(p) for p in participants}
    time.sleep(3)
    steps_before = {p: h.agent_stats(p)["training_steps"] for p in participants}
    rate = min((steps_before[p] - first[p]["training_steps"]) / 3 for p in participants)
    local_steps = max(h.agent_stats(p)["unuploaded_steps"] for p in participants) + max(20, int(rate * 15))
    version_before = current(h)["status"]["adapter"]["version"]
    h.apply(
        {
            "apiVersion": "collm.io/v1alpha1",
            "kind": "AdapterRound",
            "metadata": {"name": "restart-me", "namespace": h.namespace},
            "spec": {"clusterRef": {"name": NAME}, "participants": participants, "localSteps": local_steps, "deadlineSeconds": 120, "minParticipants": 2},
        }
    )
    h.wait_for(lambda: (h.get("adapterround", "restart-me").get("status") or {}).get("state", {}).get("startedAt"), 60, "the round started")
    h.stop_operator()
    assert condition(h.get("adapterround", "restart-me"), "Succeeded").get("status") == "Unknown"  # stopped mid-round
    time.sleep(2)
    h.start_operator()
    done = h.wait_for(
        lambda: condition(h.get("adapterround", "restart-me"), "Succeeded").get("status") in ("True", "False") and h.get("adapterround", "restart-me"),
        180,
        "the round to finish",
    )
    assert condition(done, "Succeeded")["status"] == "True", done["status"]["conditions"]
    # Once: one version was published (and, below, one start and one publish event). Agents train all
    # the time, so their step counters only say that training went on through the restart.
    assert all(h.agent_stats(p)["training_steps"] > steps_before[p] for p in participants)
    assert done["status"]["version"] == version_before + 1
    h.wait_for(lambda: current(h)["status"]["adapter"]["round"] == "restart-me" and all_serve_current(h, 3), 60, "the round's adapter everywhere")
    events = h.kubectl("get", "events", "--field-selector", "involvedObject.name=restart-me", "-o", "yaml").stdout
    assert events.count("reason: RoundStarted") == 1 and events.count("reason: Published") == 1


def test_invalid_resources_get_a_clear_condition(h):
    bad = copy.deepcopy(cluster(h))
    bad["metadata"]["name"] = "bad"
    bad["spec"]["replicas"] = 1  # minParticipants 2 > replicas 1
    proc = h.apply(bad, check=False)
    if proc.returncode != 0:  # a real API server runs the CRD's CEL rule
        assert "minParticipants must be <= spec.replicas" in proc.stderr
    else:  # the emulator does not run CEL: the operator refuses it
        obj = h.wait_for(
            lambda: condition(h.get("collmcluster", "bad"), "Ready").get("reason") == "InvalidSpec" and h.get("collmcluster", "bad"), 30, "InvalidSpec"
        )
        ready = condition(obj, "Ready")
        assert ready["status"] == "False" and "minParticipants (2) must be <= spec.replicas (1)" in ready["message"]
        assert h.get("statefulset", "bad") is None  # nothing is rolled out for an invalid spec
        time.sleep(3)
        assert condition(h.get("collmcluster", "bad"), "Ready")["lastTransitionTime"] == ready["lastTransitionTime"]  # no retry loop
        h.kubectl("delete", "collmcluster", "bad", "--timeout=60s")
    h.apply(
        {
            "apiVersion": "collm.io/v1alpha1",
            "kind": "AdapterRound",
            "metadata": {"name": "orphan", "namespace": h.namespace},
            "spec": {"clusterRef": {"name": "no-such-cluster"}},
        }
    )
    r = h.wait_for(
        lambda: condition(h.get("adapterround", "orphan"), "Succeeded").get("status") == "False" and h.get("adapterround", "orphan"), 30, "ClusterNotFound"
    )
    assert condition(r, "Succeeded")["reason"] == "ClusterNotFound" and "no-such-cluster" in condition(r, "Succeeded")["message"]
    h.kubectl("delete", "adapterround", "orphan")


def test_the_operator_serves_its_metrics(h):
    if not getattr(h, "metrics_port", None):
        pytest.skip("the operator's metrics port is not reachable from here")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    ready = f'collm_operator_ready_replicas{{cluster="{NAME}",namespace="{h.namespace}"}} 3.0'
    text = h.wait_for(lambda: ready in (t := scrape()) and t, 30, "the ready-replicas gauge at 3")
    assert 'collm_operator_rounds_total{result="Succeeded"}' in text and "collm_operator_control_step_seconds_count" in text


def _serves(h: Harness, pod: str) -> dict | None:
    try:
        return h.agent_stats(pod)["adapter"]
    except (OSError, KeyError, TypeError, AssertionError):  # no pod IP yet, agent loading
        return None


def test_every_pod_killed_with_the_operator_stopped_comes_back_serving_the_same_adapter(h):
    """Adapters lived in memory only: with every pod gone and no operator to re-publish, the
    federated adapter was lost (AdapterLost until the next round). Each replica's claim keeps it."""
    replicas = [f"{NAME}-{i}" for i in range(3)]
    # No local revisions from here on (a revision between the reading and the kill would move the target).
    h.kubectl("patch", "collmcluster", NAME, "--type", "merge", "-p", '{"spec": {"training": {"revisionEverySeconds": 0, "revisionEverySteps": 0}}}')
    h.wait_for(
        lambda: condition(current(h), "Ready").get("status") == "True" and current(h)["status"]["observedGeneration"] == current(h)["metadata"]["generation"],
        240,
        "the pods rolled onto the new settings",
    )
    h.wait_for(lambda: all_serve_current(h, 3), 120, "every replica on the cluster's adapter")
    claims = {c["metadata"]["name"] for c in h.get("persistentvolumeclaim", selector=f"app.kubernetes.io/instance={NAME}")}
    assert claims == {f"state-{r}" for r in replicas}
    h.stop_operator()
    before = {r: h.agent_stats(r)["adapter"] for r in replicas}
    assert all(a["cluster_version"] >= 1 for a in before.values()), before
    uids = {r: h.get("pod", r)["metadata"]["uid"] for r in replicas}
    h.kubectl("delete", "pod", "-l", f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=agent", "--grace-period=0", "--force", "--wait=false")
    h.wait_for(lambda: all((h.get("pod", r) or {}).get("metadata", {}).get("uid") not in (None, uids[r]) for r in replicas), 60, "new pods")

    def all_serving() -> dict | None:
        found = {r: _serves(h, r) for r in replicas}
        return found if all(found.values()) else None

    after = h.wait_for(all_serving, 180, "every new agent serving")
    for r in replicas:
        assert (after[r]["sha256"], after[r]["cluster_version"], after[r]["revision"]) == (
            before[r]["sha256"],
            before[r]["cluster_version"],
            before[r]["revision"],
        ), r
    h.start_operator()
    h.wait_for(lambda: condition(current(h), "Ready").get("status") == "True", 120, "Ready with the operator back")
    assert condition(current(h), "Degraded").get("reason") != "AdapterLost"


def test_delete_removes_every_child_and_the_finalizer(h):
    h.kubectl("delete", "collmcluster", NAME, "--timeout=120s", timeout=150)
    assert h.get("collmcluster", NAME) is None
    h.wait_for(lambda: all(not h.get(kind, selector=f"app.kubernetes.io/instance={NAME}") for kind in CHILDREN + ("pod",)), 60, "children gone")
    # Scheduled rounds were the cluster's; a hand-made round is the user's and stays (as a record).
    assert [r["metadata"]["name"] for r in h.get("adapterround", selector=f"collm.io/cluster={NAME}")] == ["restart-me"]
    h.kubectl("delete", "adapterround", "restart-me")


def test_a_qwen3_cluster_serves_and_trains(h):
    """Another model family through the operator: a Qwen3 layout (q/k norms, explicit head_dim)."""
    obj = cluster(h)
    obj["metadata"]["name"] = "qwen"
    obj["spec"].update(model={"source": "random:qwen3"}, replicas=1)
    obj["spec"]["federation"]["minParticipants"] = 1
    h.apply(obj)
    try:
        h.kubectl("wait", "--for=condition=Ready", "collmcluster/qwen", "--timeout=180s", timeout=200)
        answer = h.agent_generate("qwen-0", "def parse(")
        assert 1 <= answer["details"]["generated_tokens"] <= 8 and isinstance(answer["generated_text"], str)
        stats = h.wait_for(lambda: (st := h.agent_stats("qwen-0"))["training_steps"] > 0 and st, 60, "the Qwen3 replica training")
        assert stats["model"] == "random-qwen3" and stats["requests_finished"] >= 1
    finally:
        h.kubectl("delete", "collmcluster", "qwen", "--timeout=120s", timeout=150)


def test_dp_rounds_stop_at_the_privacy_budget(h):
    """DP rounds are charged to the cluster's privacy ledger (status.privacy, the operator's metric);
    once one more round would pass spec.federation.epsilonBudget, none starts."""
    obj = cluster(h)
    obj["metadata"]["name"] = "dp"
    obj["spec"]["federation"].update(noiseMultiplier="1.0", clipNorm="1.0", epsilonBudget="10", privacyDelta="1e-5")
    h.apply(obj)
    try:
        h.kubectl("wait", "--for=condition=Ready", "collmcluster/dp", "--timeout=180s", timeout=200)
        spent = h.wait_for(
            lambda: (p := (h.get("collmcluster", "dp").get("status") or {}).get("privacy") or {}).get("roundsLeft") == 0 and p, 240, "the budget spent"
        )
        rounds = spent["ledger"][0]["rounds"]
        assert spent["ledger"] == [{"noiseMultiplier": 1.0, "rounds": rounds}] and rounds >= 1 and 0 < float(spent["epsilon"]) <= 10
        print(f"\nprivacy accountant after the run: {json.dumps(spent)}")  # the figures docs/security.md quotes
        created = h.get("collmcluster", "dp")["status"]["roundsCreated"]
        time.sleep(20)  # 2.5 round intervals: nothing new may start
        assert h.get("collmcluster", "dp")["status"]["roundsCreated"] == created == rounds
        events = h.kubectl("get", "events", "--field-selector", "involvedObject.name=dp", "-o", "yaml").stdout
        assert "PrivacyBudgetSpent" in events
    finally:
        h.kubectl("delete", "collmcluster", "dp", "--timeout=120s", timeout=150)
