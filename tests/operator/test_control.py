"""The operator's pure decision code, with no cluster, agent or network: the cluster conditions
(reconcile.cluster_conditions), the AdapterRound roles and status (round_control), the current
adapter and its laggards (control), the scheduled round object (objects.build_round, validated
against the CRD) and the slow-timescale planner (planning.Planner) on fake agent stats.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest

from collm_control import planning
from collm_control import rounds as R
from collm_control.decide import Adapter, ControlSettings, Observation, current_adapter, decide, laggards, next_version
from collm_control.stats import AdapterRef, AgentStats, CapacityPoint
from collm_operator import api, control, objects, round_control
from collm_operator.control import published_adapter
from collm_operator.reconcile import Health, Pod, Workloads, cluster_conditions
from collm_operator.round_control import choose_roles, failed_status, finished, round_id, round_status

from .test_manifests import openapi_schema, to_jsonschema

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
STAMP = "2026-01-02T03:04:05Z"
NAMES = ("demo-0", "demo-1", "demo-2")
SECURE = {"secureAggregation": True, "aggregation": "fedavg", "secureAggregationSecretRef": "round-secret"}


def cluster(spec: dict | None = None, generation: int = 2) -> api.Cluster:
    return api.parse_cluster(
        {
            "metadata": {"name": "demo", "namespace": "team-a", "uid": "0000-uid", "generation": generation},
            "spec": {"model": {"source": "tiny"}, "replicas": 3, "training": {"dataVolume": {"hostPath": {"path": "/srv/data"}}}, **(spec or {})},
        }
    )


def workloads(*, rolled_out=True, router=True, **pods: Pod) -> Workloads:
    """Every replica ready unless `pods` overrides it (None removes the pod)."""
    found = {n: Pod(n, f"10.0.0.{i}", True) for i, n in enumerate(NAMES)}
    for key, pod in pods.items():
        del found[key.replace("_", "-")]
        found.update({pod.name: pod} if pod else {})
    return Workloads(found, 3 if rolled_out else 1, rolled_out, router)


def healthy(**changes) -> Health:
    return Health(**{"reachable": frozenset(NAMES), "with_data": 3, **changes})


def judge(w=None, h=None, c=None, previous=None, now=NOW):
    j = cluster_conditions(previous, c or cluster(), w or workloads(), h or healthy(), now)
    return j, {x["type"]: x for x in j.conditions}


def status_reason(condition: dict) -> tuple[str, str]:
    return condition["status"], condition["reason"]


# --- reconcile.cluster_conditions ------------------------------------------------------------------


def test_all_healthy_is_ready_available_for_the_clusters_generation():
    j, c = judge(c=cluster(generation=7))
    assert [x["type"] for x in j.conditions] == ["Ready", "Progressing", "Degraded", "TrainingActive"]
    assert status_reason(c["Ready"]) == ("True", "Available")
    assert status_reason(c["Progressing"]) == ("False", "AsExpected")
    assert status_reason(c["Degraded"]) == ("False", "AsExpected")
    assert status_reason(c["TrainingActive"]) == ("False", "Waiting")
    assert j.ready_replicas == 3
    assert {x["observedGeneration"] for x in j.conditions} == {7}
    assert {x["lastTransitionTime"] for x in j.conditions} == {STAMP}


@pytest.mark.parametrize("w", [workloads(rolled_out=False), workloads(demo_2=None)], ids=["not-rolled-out", "pod-missing"])
def test_rollout_in_progress_is_progressing_and_not_ready(w):
    j, c = judge(w)
    assert status_reason(c["Progressing"]) == ("True", "RollingOut")
    assert status_reason(c["Degraded"]) == ("False", "AsExpected")  # a rollout is not a degradation
    assert status_reason(c["Ready"]) == ("False", "RollingOut")
    assert c["Ready"]["message"].startswith("Progressing: ")


def test_a_starting_pod_is_progressing_not_degraded():
    j, c = judge(workloads(demo_2=Pod("demo-2", None, False, restarts=0)))
    assert status_reason(c["Progressing"]) == ("True", "RollingOut")
    assert "starting: demo-2" in c["Progressing"]["message"]
    assert status_reason(c["Degraded"]) == ("False", "AsExpected")
    assert c["Ready"]["status"] == "False" and j.ready_replicas == 2


def test_a_restarted_pod_that_is_not_ready_degrades_the_cluster():
    j, c = judge(workloads(demo_1=Pod("demo-1", "10.0.0.1", False, restarts=3)))
    assert status_reason(c["Progressing"]) == ("False", "AsExpected")
    assert status_reason(c["Degraded"]) == ("True", "ReplicasUnavailable")
    assert c["Degraded"]["message"] == "2 of 3 replicas serve; not serving: demo-1"
    assert status_reason(c["Ready"]) == ("False", "ReplicasUnavailable")
    assert j.ready_replicas == 2


def test_ready_replicas_counts_only_ready_pods_whose_agent_answers():
    j, c = judge(h=healthy(reachable=frozenset({"demo-0", "demo-2"})))
    assert j.ready_replicas == 2
    assert status_reason(c["Degraded"]) == ("True", "ReplicasUnavailable")
    assert c["Degraded"]["message"].endswith("not serving: demo-1")


def test_router_without_available_pod_degrades_the_cluster():
    _, c = judge(workloads(router=False))
    assert status_reason(c["Degraded"]) == ("True", "RouterUnavailable")
    assert "demo-router" in c["Degraded"]["message"]
    assert status_reason(c["Ready"]) == ("False", "RouterUnavailable")


def test_a_replica_whose_state_volume_takes_no_write_degrades_the_cluster():
    _, c = judge(h=healthy(state_errors=("demo-1: cannot checkpoint the shadow adapter to /state ([Errno 28] No space left on device)",)))
    assert status_reason(c["Degraded"]) == ("True", "StateNotSaved")
    assert c["Degraded"]["message"].startswith("demo-1: cannot checkpoint") and c["Ready"]["status"] == "False"


@pytest.mark.parametrize("attainment, requests, degraded", [(0.8, 20, True), (0.8, 19, False), (0.9, 500, False), (0.0, 0, False)])
def test_slo_missed_only_below_90_percent_with_enough_requests(attainment, requests, degraded):
    _, c = judge(h=healthy(slo_attainment=attainment, slo_requests=requests))
    if degraded:
        assert status_reason(c["Degraded"]) == ("True", "SloMissed")
        assert c["Degraded"]["message"].startswith("80.0% of the last 20 requests met the SLO (TTFT <= 1000 ms, TPOT <= 100 ms)")
        assert c["Ready"]["status"] == "False"
    else:
        assert status_reason(c["Degraded"]) == ("False", "AsExpected")
        assert c["Ready"]["status"] == "True"


def test_laggards_are_publishing_the_adapter_only_while_every_replica_serves():
    _, c = judge(h=healthy(laggards=("demo-1", "demo-2")))
    assert status_reason(c["Progressing"]) == ("True", "PublishingAdapter")
    assert c["Progressing"]["message"] == "publishing the current adapter to demo-1, demo-2"
    assert status_reason(c["Ready"]) == ("False", "PublishingAdapter")
    _, c = judge(workloads(demo_0=Pod("demo-0", "10.0.0.0", False, restarts=1)), healthy(laggards=("demo-1",)))
    assert status_reason(c["Progressing"]) == ("False", "AsExpected")
    assert status_reason(c["Degraded"]) == ("True", "ReplicasUnavailable")


@pytest.mark.parametrize(
    "spec, health, expected, message",
    [
        ({"scheduling": {"policy": "inferenceOnly"}}, {"training": ("demo-0",)}, ("False", "TrainingDisabled"), "scheduling.policy is inferenceOnly"),
        ({"training": {}}, {"training": ("demo-0",)}, ("False", "TrainingDisabled"), "spec.training.dataVolume is not set"),
        ({}, {"training": ("demo-0", "demo-2")}, ("True", "Training"), "2 replicas fine-tune: demo-0, demo-2"),
        ({}, {"with_data": 0}, ("False", "NoTrainingData"), "no replica found training data under /data: put files there"),
        ({}, {"with_data": 0, "reachable": frozenset()}, ("False", "Waiting"), None),
    ],
    ids=["inferenceOnly", "no-dataVolume", "training", "no-data", "nobody-reachable"],
)
def test_training_active_variants(spec, health, expected, message):
    _, c = judge(c=cluster(spec), h=healthy(**health))
    assert status_reason(c["TrainingActive"]) == expected
    assert message is None or c["TrainingActive"]["message"] == message
    if "reachable" not in health:  # informational: it never holds Ready back (an inferenceOnly cluster is Ready)
        assert status_reason(c["Ready"]) == ("True", "Available")


def test_last_transition_time_moves_only_when_the_status_changes():
    first, _ = judge()
    later = NOW + timedelta(minutes=5)
    second, _ = judge(previous=first.conditions, now=later, c=cluster(generation=3))
    assert second.conditions == [{**x, "observedGeneration": 3} for x in first.conditions]
    third, c3 = judge(workloads(router=False), previous=second.conditions, now=later + timedelta(minutes=1))
    assert c3["Degraded"]["lastTransitionTime"] == "2026-01-02T03:10:05Z"
    assert c3["Ready"]["lastTransitionTime"] == "2026-01-02T03:10:05Z"
    assert c3["Progressing"]["lastTransitionTime"] == c3["TrainingActive"]["lastTransitionTime"] == STAMP
    assert {x["observedGeneration"] for x in third.conditions} == {2}


# --- round_control ---------------------------------------------------------------------------------


def test_finished_once_succeeded_is_true_or_false_and_round_ids_carry_the_uid():
    assert not finished(None) and not finished({}) and not finished({"conditions": []})
    assert not finished({"conditions": [{"type": "Succeeded", "status": "Unknown"}, {"type": "Trained", "status": "True"}]})
    assert finished({"conditions": [{"type": "Succeeded", "status": "True"}]})
    assert finished({"conditions": [{"type": "Succeeded", "status": "False"}]})
    assert round_id("demo-round-4", "1234abcd-5678-0000") == "demo-round-4-1234abcd"
    assert round_id("demo-round-4", "") == "demo-round-4"


def roles(spec=None, serving=NAMES, with_data=NAMES, c=None, **round_spec):
    return choose_roles(c or cluster(spec), api.RoundSpec("demo", **round_spec), list(serving), list(with_data))


def test_participants_default_to_serving_replicas_with_data_unless_listed():
    r = roles(with_data=["demo-0", "demo-2"])
    assert r == round_control.Roles(("demo-0", "demo-2"), "demo-0", NAMES)
    r = roles(with_data=["demo-0"], participants=("demo-1", "demo-2"), aggregator="demo-0")
    assert (r.participants, r.aggregator) == (("demo-1", "demo-2"), "demo-0")


def test_explicit_participant_that_does_not_serve_is_named():
    with pytest.raises(ValueError, match=r"spec.participants \['demo-7'\] do not serve now"):
        roles(participants=("demo-0", "demo-7"))
    with pytest.raises(ValueError, match="spec.aggregator 'demo-7' does not serve now"):
        roles(aggregator="demo-7")


def test_nobody_with_data_cannot_start_a_round():
    with pytest.raises(ValueError, match="no replica of demo can train now: 3 serve, 0 have data under /data"):
        roles(with_data=[])
    with pytest.raises(ValueError, match="no replica of demo can train now"):
        roles(serving=[], with_data=[])


def test_secure_aggregation_aggregates_outside_the_participants():
    secure = {"federation": SECURE}
    assert roles(secure, with_data=["demo-0", "demo-1"]) == round_control.Roles(("demo-0", "demo-1"), "demo-2", NAMES)
    # everyone has data: the last one aggregates instead of training
    assert roles(secure) == round_control.Roles(("demo-0", "demo-1"), "demo-2", NAMES)


def test_a_scheduled_secure_round_with_every_replica_holding_data_can_start():
    class Kube:  # control._create_round only creates the round
        def create(self, obj):
            self.created = obj
            return obj

    c, kube, stats = cluster({"federation": SECURE}), Kube(), {n: agent() for n in NAMES}
    ctl = control.ClusterController(kube)
    settings = ControlSettings(min_participants=c.spec.federation.min_participants, secure_aggregation=True)
    actions = decide(ctl._planner(c, 0.0), Observation(now=5.0, arrivals=50, stats=stats), settings)  # participationPercent 100: all three train
    assert actions.round is not None and actions.round.aggregator not in actions.round.participants
    assert ctl._create_round(c, actions, 1000.0)["lastRound"] == "demo-round-1"
    spec = api.parse_round(kube.created).spec.resolved(c.spec.federation)
    r = choose_roles(c, spec, list(NAMES), list(NAMES))  # what drive() does: raises "no replica of demo can train now"
    assert r.aggregator not in r.participants and len(r.participants) >= c.spec.federation.min_participants


@pytest.mark.parametrize(
    "serving, round_spec",
    [
        (NAMES, {"participants": NAMES}),  # every serving replica is listed: nobody is left to aggregate
        (["demo-0"], {}),  # a single replica cannot both train and aggregate
    ],
)
def test_secure_aggregation_raises_when_no_outside_aggregator_exists(serving, round_spec):
    with pytest.raises(ValueError):
        roles({"federation": SECURE}, serving=serving, with_data=serving, **round_spec)


def test_a_named_secure_aggregator_is_left_out_of_the_default_participants():
    r = roles({"federation": SECURE}, serving=NAMES, with_data=NAMES, aggregator="demo-0")
    assert (r.aggregator, r.participants) == ("demo-0", ("demo-1", "demo-2"))


@pytest.mark.parametrize("serving, round_spec", [(NAMES, {"participants": NAMES}), (["demo-0"], {})], ids=["all-listed", "one-replica"])
def test_secure_aggregation_error_says_an_outside_aggregator_is_missing(serving, round_spec):
    with pytest.raises(ValueError, match="secure aggregation needs an aggregator that is not a participant"):
        roles({"federation": SECURE}, serving=serving, with_data=serving, **round_spec)


T0 = NOW.timestamp()
SHA = {"demo-0": "a" * 64, "demo-1": "b" * 64, "candidate": "c" * 64}
SPEC = R.RoundSpec(
    round_id="demo-round-1-0000uid", replicas=NAMES, participants=("demo-0", "demo-1"), aggregator="demo-0", local_steps=5, deadline_s=60.0, min_participants=2
)


def drive(*events) -> R.RoundState:
    state = R.start(SPEC)
    for event in events:
        state, actions = R.step(state, event)
        assert not [a for a in actions if isinstance(a, R.Refused)], actions
    return state


TRAINED = (R.Started(T0, "0", ""), R.UpdateUploaded(T0 + 10, "demo-0", 10, SHA["demo-0"], 1000), R.UpdateUploaded(T0 + 12, "demo-1", 30, SHA["demo-1"], 1500))
SUCCESSFUL = TRAINED + (
    R.Aggregated(T0 + 15, SHA["candidate"], ("demo-0", "demo-1"), (), 2500),
    R.Evaluated(T0 + 20, "demo-0", 1.5, 2.0, 100),
    R.Evaluated(T0 + 21, "demo-1", 1.25, 1.75, 300),
    *(R.PublishAcked(T0 + t, n, SHA["candidate"]) for t, n in ((25, "demo-0"), (26, "demo-1"), (30, "demo-2"))),
)


def render(state: R.RoundState, generation=1, version=1, now=NOW) -> dict:
    """round_status, checked against the AdapterRound CRD's status schema."""
    status = round_status(state, generation=generation, version=version, now=now)
    jsonschema.validate(status, to_jsonschema(openapi_schema("AdapterRound"))["properties"]["status"])
    return status


def at(seconds: float) -> str:
    return (NOW + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_round_status_of_a_successful_round():
    state = drive(*SUCCESSFUL)
    s = render(state, generation=4, version=3)
    c = {x["type"]: x for x in s["conditions"]}
    assert [x["type"] for x in s["conditions"]] == ["Trained", "Aggregated", "Evaluated", "Published", "Succeeded"]
    assert {t: status_reason(x) for t, x in c.items()} == {
        "Trained": ("True", "Collected"),
        "Aggregated": ("True", "Aggregated"),
        "Evaluated": ("True", "GatePassed"),
        "Published": ("True", "Published"),
        "Succeeded": ("True", "Published"),
    }
    assert {x["observedGeneration"] for x in s["conditions"]} == {4}
    assert c["Trained"]["lastTransitionTime"] == at(12) and c["Succeeded"]["lastTransitionTime"] == at(30)
    assert s["participants"] == [
        {"name": "demo-0", "outcome": "Accepted", "reason": "", "bytes": 1000, "sha256": SHA["demo-0"], "candidateLoss": "1.5000", "currentLoss": "2.0000"},
        {"name": "demo-1", "outcome": "Accepted", "reason": "", "bytes": 1500, "sha256": SHA["demo-1"], "candidateLoss": "1.2500", "currentLoss": "1.7500"},
    ]
    assert (s["version"], s["sha256"], s["aggregator"], s["bytesTransferred"]) == (3, SHA["candidate"], "demo-0", 2500)
    assert (s["evalLossBefore"], s["evalLossAfter"], s["freshnessSeconds"]) == ("1.8125", "1.3125", "15.000")
    assert s["timings"] == {"train": "12.000", "aggregate": "3.000", "evaluate": "6.000", "publish": "9.000", "total": "30.000"}
    assert finished(s) and s["observedGeneration"] == 4
    assert R.RoundState.from_dict(json.loads(json.dumps(s["state"]))) == state


def test_round_status_while_training_has_pending_stages_and_no_result():
    state = drive(*TRAINED[:2])
    s = render(state)
    assert {x["type"]: status_reason(x) for x in s["conditions"]} == {
        t: ("Unknown", "Pending") for t in ("Trained", "Aggregated", "Evaluated", "Published", "Succeeded")
    }
    assert [(p["name"], p["outcome"]) for p in s["participants"]] == [("demo-0", "Uploaded"), ("demo-1", "Pending")]
    assert "candidateLoss" not in s["participants"][0] and "sha256" not in s["participants"][1]
    assert s["timings"] == {} and s["bytesTransferred"] == 1000
    assert not {"sha256", "evalLossBefore", "evalLossAfter", "freshnessSeconds"} & set(s)
    assert not finished(s)
    assert R.RoundState.from_dict(s["state"]) == state


def test_round_status_of_a_round_whose_updates_were_all_rejected():
    state = drive(*TRAINED, R.Aggregated(T0 + 15, "no-candidate", (), (("demo-0", "NormTooLarge"), ("demo-1", "NormTooLarge")), 2500))
    s = render(state)
    c = {x["type"]: x for x in s["conditions"]}
    assert status_reason(c["Aggregated"]) == ("False", "NoUpdateAccepted")
    assert status_reason(c["Succeeded"]) == ("False", "NoUpdateAccepted")
    assert status_reason(c["Evaluated"]) == ("Unknown", "Pending")
    assert [(p["outcome"], p["reason"]) for p in s["participants"]] == [("Rejected", "NormTooLarge")] * 2
    assert "sha256" not in s and finished(s)
    assert s["timings"] == {"train": "12.000", "aggregate": "3.000", "total": "15.000"}


def test_round_status_keeps_the_transition_time_of_stages_still_pending():
    early = round_status(drive(*TRAINED[:2]), generation=1, version=1, now=NOW + timedelta(seconds=11))
    later = round_status(drive(*TRAINED), generation=1, version=1, now=NOW + timedelta(seconds=60))
    pending = lambda s: {x["type"]: x["lastTransitionTime"] for x in s["conditions"] if x["status"] == "Unknown"}  # noqa: E731
    assert pending(later) == {t: pending(early)[t] for t in pending(later)}  # Aggregated..Succeeded stayed Unknown


def test_failed_status_sets_succeeded_false_and_keeps_other_conditions():
    previous = {
        "conditions": [
            {"type": "Trained", "status": "Unknown", "reason": "Pending", "message": "", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]
    }
    s = failed_status(previous, 2, "ClusterNotFound", "CollmCluster 'nope' does not exist", NOW)
    assert s["observedGeneration"] == 2
    assert s["conditions"][0] == previous["conditions"][0]
    assert s["conditions"][1] == {
        "type": "Succeeded",
        "status": "False",
        "reason": "ClusterNotFound",
        "message": "CollmCluster 'nope' does not exist",
        "observedGeneration": 2,
        "lastTransitionTime": STAMP,
    }
    assert finished(s) and failed_status(None, 1, "InvalidSpec", "x", NOW)["conditions"][0]["type"] == "Succeeded"


# --- control: the current adapter and its laggards ---------------------------------------------------


def adapter_round(name: str, succeeded: str | None, version: int, sha: str, loss: str | None = None) -> dict:
    conditions = [{"type": "Succeeded", "status": succeeded}] if succeeded else []
    return {"metadata": {"name": name}, "status": {"conditions": conditions, "version": version, "sha256": sha, "evalLossAfter": loss}}


def serving(sha: str | None, cluster_version: int = 0, revision: int = 0) -> AgentStats:
    """An agent's stats: it rests on global `sha` (cluster version) and serves a local revision on it."""
    if not sha:
        return AgentStats("r")
    return AgentStats(
        "r",
        adapter=AdapterRef(f"{cluster_version}.{revision}", cluster_version, f"{sha}.r{revision}" if revision else sha, revision),
        global_adapter=AdapterRef(f"{cluster_version}.0", cluster_version, sha),
    )


def current(status, rounds, stats):
    """What the operator's step computes: the newest adapter its rounds published, else the agents' agreement."""
    return current_adapter(published_adapter(status, rounds), stats)


STATUS = {"adapter": {"version": 2, "sha256": "s2", "round": "demo-round-2", "evalLoss": "1.2000"}}


def test_the_status_adapter_unless_a_newer_round_succeeded():
    assert current(STATUS, [], {"demo-0": serving("other")}) == Adapter(2, "s2", "demo-round-2", "1.2000")
    assert Adapter(2, "s2", "r").as_status() == {"version": 2, "sha256": "s2", "round": "r"}
    rounds = [
        adapter_round("demo-round-1", "True", 1, "s1"),
        adapter_round("demo-round-3", "True", 3, "s3", "1.1000"),
        adapter_round("demo-round-4", "False", 4, "s4"),
        adapter_round("demo-round-5", None, 5, "s5"),
    ]
    assert current(STATUS, rounds, {}) == Adapter(3, "s3", "demo-round-3", "1.1000")
    assert current({}, rounds[:1], {}) == Adapter(1, "s1", "demo-round-1", None)
    assert current(STATUS, rounds[:1] + rounds[2:], {}) == Adapter(2, "s2", "demo-round-2", "1.2000")


@pytest.mark.parametrize(
    "stats, expected",
    [
        ({"demo-0": serving("base"), "demo-1": serving("base")}, Adapter(0, "base")),
        ({"demo-0": serving("base"), "demo-1": serving("other")}, None),
        ({"demo-0": serving("base"), "demo-1": None}, None),
        ({"demo-0": serving(None), "demo-1": serving(None)}, None),
        ({}, None),
    ],
    ids=["agree", "disagree", "one-silent", "none-serves-an-adapter", "no-agents"],
)
def test_before_any_round_the_adapter_every_agent_agrees_on(stats, expected):
    assert current({}, [], stats) == expected


def test_laggards_are_agents_on_an_older_adapter_only():
    stats = {"demo-3": serving("s2", 2), "demo-0": serving("s3", 3), "demo-1": None, "demo-2": serving("s4", 4), "demo-4": AgentStats("demo-4")}
    assert laggards(Adapter(3, "s3"), stats) == ["demo-3", "demo-4"]
    assert laggards(None, stats) == []
    assert laggards(Adapter(0, "base"), {"demo-0": serving("base"), "demo-1": serving("x", 0)}) == ["demo-1"]
    # A local revision on top of the current global is that global plus local progress: not lagging.
    assert laggards(Adapter(3, "s3"), {"demo-0": serving("s3", 3, revision=4)}) == []


# --- objects.build_round ----------------------------------------------------------------------------


@pytest.mark.parametrize("aggregator", ["demo-2", None])
def test_build_round_is_owned_labelled_and_valid_against_the_crd(aggregator):
    obj = objects.build_round(cluster(), 4, ["demo-0", "demo-1"], aggregator)
    meta = obj["metadata"]
    assert (obj["apiVersion"], obj["kind"], meta["name"], meta["namespace"]) == ("collm.io/v1alpha1", "AdapterRound", "demo-round-4", "team-a")
    assert meta["labels"]["collm.io/cluster"] == "demo" and meta["labels"]["collm.io/scheduled"] == "true"
    assert meta["ownerReferences"] == [
        {"apiVersion": "collm.io/v1alpha1", "kind": "CollmCluster", "name": "demo", "uid": "0000-uid", "controller": True, "blockOwnerDeletion": True}
    ]
    expected = {"clusterRef": {"name": "demo"}, "participants": ["demo-0", "demo-1"]}
    assert obj["spec"] == (expected if aggregator is None else {**expected, "aggregator": aggregator})  # None: the round picks one
    jsonschema.validate(obj, to_jsonschema(openapi_schema("AdapterRound")))
    parsed = api.parse_round(obj)
    assert (parsed.name, parsed.namespace, parsed.spec.cluster_name, parsed.spec.participants, parsed.spec.aggregator) == (
        "demo-round-4",
        "team-a",
        "demo",
        ("demo-0", "demo-1"),
        aggregator,
    )


# --- planning.Planner -------------------------------------------------------------------------------

PROFILE = [[0, 40.0, 0.0], [64, 25.0, 400.0], [128, 10.0, 800.0]]


def agent(eval_loss: float | None = 2.0, profile=PROFILE, trainer_error="") -> AgentStats:
    return AgentStats("r", capacity_profile=tuple(CapacityPoint(*p) for p in profile), eval_loss=eval_loss, trainer_error=trainer_error)


def plan(stats, policy="coexec", arrivals=50, **kwargs) -> planning.Decision:
    return planning.Planner(planning.PlanningSettings(policy=policy), now=0.0).plan(5.0, arrivals, stats, **kwargs)


def test_inference_only_gives_every_replica_cap_zero():
    d = plan({"demo-0": agent(profile=[[8, 40.0, 100.0], [128, 10.0, 800.0]]), "demo-1": agent()}, policy="inferenceOnly")
    assert d.allocation.caps["demo-0"] == 8  # the allocation keeps the profile's lowest cap...
    assert d.cap("demo-0") == d.cap("demo-1") == 0  # ...but an inferenceOnly plan never trains
    assert d.allocation.participants == ()
    assert sum(d.allocation.weights.values()) == pytest.approx(1.0)


def test_only_replicas_with_eval_loss_train_and_silent_agents_get_no_traffic():
    d = plan({"demo-0": agent(), "demo-1": agent(eval_loss=None), "demo-2": None})
    assert d.allocation.participants == ("demo-0",)
    assert {s.name: (s.healthy, s.data_tokens) for s in d.states} == {"demo-0": (True, 1), "demo-1": (True, 0), "demo-2": (False, 0)}
    assert d.allocation.weights == pytest.approx({"demo-0": 0.5, "demo-1": 0.5, "demo-2": 0.0})
    assert (d.cap("demo-0"), d.cap("demo-2")) == (128, 0)


def test_an_agent_whose_trainer_failed_still_serves_but_does_not_train():
    d = plan({"demo-0": agent(), "demo-1": agent(), "demo-2": agent(trainer_error="RuntimeError: CUDA out of memory")})
    assert "demo-2" not in d.allocation.participants
    assert d.allocation.weights["demo-2"] == pytest.approx(1 / 3)  # the trainer stopped, serving goes on (trainer.py)


def test_running_round_participants_keep_the_round_min_cap_under_coexec():
    stats = {"demo-0": agent(), "demo-1": agent()}
    plain = plan(stats, arrivals=300)  # 60 req/s: the cheapest cut takes demo-0's cap to 0
    assert (plain.cap("demo-0"), plain.cap("demo-1")) == (0, 56)
    kept = plan(stats, arrivals=300, round_participants=("demo-0",))
    assert (kept.cap("demo-0"), kept.cap("demo-1")) == (16, 56)
    assert plan(stats, policy="inferenceOnly", arrivals=300, round_participants=("demo-0",)).cap("demo-0") == 0


def test_planning_settings_validate_the_policy():
    with pytest.raises(ValueError, match="unknown scheduling policy 'greedy'"):
        planning.PlanningSettings(policy="greedy")
    with pytest.raises(ValueError, match="slow_interval_s"):
        planning.PlanningSettings(slow_interval_s=0)


def test_a_policy_change_replaces_the_controllers_planner():
    ctl = control.ClusterController(kube=None)
    first = ctl._planner(cluster(), 0.0)
    assert ctl._planner(cluster(), 10.0) is first
    changed = ctl._planner(cluster({"scheduling": {"policy": "inferenceOnly"}}), 20.0)
    assert changed is not first and changed.settings.policy == "inferenceOnly"
    ctl.close()


# --- apply: kubectl's three-way merge; round ordering and versions ------------------------------------


def test_three_way_patch_removes_what_the_last_apply_set_and_the_spec_dropped():
    from collm_operator.kube import merge_patch, three_way_patch

    last = {"spec": {"template": {"spec": {"nodeSelector": {"gpu": "true"}, "containers": [{"name": "a"}]}}}}
    desired = {"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}}
    live = {
        "spec": {"template": {"spec": {"nodeSelector": {"gpu": "true"}, "containers": [{"name": "a"}], "dnsPolicy": "ClusterFirst"}}},
        "status": {"replicas": 2},
    }
    patch = three_way_patch(last, desired)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None
    after = merge_patch(live, patch)
    assert "nodeSelector" not in after["spec"]["template"]["spec"]  # removed from the spec, so from the child
    assert after["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirst" and after["status"] == {"replicas": 2}  # others' fields stay
    assert after["spec"]["template"]["spec"]["containers"] == [{"name": "a", "image": "x"}]  # lists are replaced whole
    assert merge_patch(after, three_way_patch(desired, desired)) == after  # re-applying changes nothing


def round_obj(name: str, created: str, state: bool = False, succeeded: str | None = None, version: int = 0) -> dict:
    status: dict = {"version": version} if version else {}
    if state:
        status["state"] = {"startedAt": 1.0}
    if succeeded:
        status["conditions"] = [{"type": "Succeeded", "status": succeeded}]
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def test_one_round_of_a_cluster_runs_at_a_time_in_creation_order():
    me = round_obj("b", "2026-01-01T00:00:05Z")
    assert round_control._ahead(me, round_obj("a", "2026-01-01T00:00:01Z"))  # created earlier
    assert round_control._ahead(me, round_obj("c", "2026-01-01T00:00:09Z", state=True))  # already running
    assert not round_control._ahead(me, round_obj("c", "2026-01-01T00:00:09Z"))  # created later, not started
    assert not round_control._ahead(me, round_obj("a", "2026-01-01T00:00:01Z", state=True, succeeded="True"))  # finished
    assert not round_control._ahead(me, me)


def test_versions_only_grow_past_anything_known():
    rounds = [round_obj("a", "t", succeeded="True", version=3), round_obj("b", "t", succeeded="False", version=5)]
    claimed = [3, *(int(r["status"].get("version") or 0) for r in rounds)]  # the cluster's adapter and every round's
    assert next_version({"demo-0": serving("f" * 64, 4), "demo-1": None}, claimed) == 6
    assert next_version({"demo-0": serving("f" * 64, 7)}) == 8  # an agent saw a newer round
    assert next_version({}) == 1


class FakeKube:
    """apply() answers from a script: True (changed), False (unchanged) or an exception."""

    def __init__(self, answer):
        self.answer, self.applied = answer, []

    def apply(self, obj):
        self.applied.append(obj["kind"])
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def delete(self, *args):
        return False


def cluster_body(spec: dict | None = None) -> dict:
    return {
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "0000-uid", "generation": 2},
        "spec": {"model": {"source": "tiny"}, "replicas": 3, **(spec or {})},
    }


def test_reconcile_flips_progressing_only_when_a_child_changed():
    from collm_operator.reconcile import reconcile_cluster

    changed = reconcile_cluster(FakeKube(True), cluster_body(), None, NOW)
    assert [(c["type"], c["status"], c["reason"]) for c in changed.status["conditions"]] == [
        ("Ready", "False", "RollingOut"),
        ("Progressing", "True", "RollingOut"),
    ]
    assert changed.events[0][1] == "Applied"
    same = reconcile_cluster(FakeKube(False), cluster_body(), None, NOW)  # an operator restart: nothing to roll out
    assert same.status == {} and same.events == [] and not same.invalid


def test_a_child_the_api_server_refuses_is_an_invalid_spec_not_a_retry_loop():
    from collm_operator.kube import ApiException
    from collm_operator.reconcile import reconcile_cluster

    refused = ApiException(status=422, reason="Unprocessable Entity")
    refused.body = json.dumps({"message": 'StatefulSet.apps "demo" is invalid: spec.template.spec.containers[0].resources.limits[cpu]: Invalid value: "lots"'})
    result = reconcile_cluster(FakeKube(refused), cluster_body({"resources": {"limits": {"cpu": "lots"}}}), None, NOW)
    ready = result.status["conditions"][0]
    assert result.invalid and (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert 'resources.limits[cpu]: Invalid value: "lots"' in ready["message"] and "fix the spec" in ready["message"]
    with pytest.raises(ApiException):  # anything else (the API down) is kopf's to retry
        reconcile_cluster(FakeKube(ApiException(status=503, reason="Unavailable")), cluster_body(), None, NOW)
