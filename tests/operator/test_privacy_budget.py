"""The privacy budget in the operator: status.privacy figures, the charge at round start, and a round
refused (Succeeded=False, PrivacyBudgetSpent) against the emulated API server once the budget is spent."""

from __future__ import annotations

import pytest

from collm_control import privacy
from collm_operator import api, privacy_budget, round_control

DP = {"noiseMultiplier": "1.0", "clipNorm": "1.0", "epsilonBudget": "10", "privacyDelta": "1e-5", "minParticipants": 1}


def body(federation: dict | None = None, status: dict | None = None) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.CLUSTER_KIND,
        "metadata": {"name": "dp", "namespace": "default", "uid": "uid-dp", "generation": 1},
        "spec": {"model": {"source": "tiny"}, "replicas": 2, "federation": {**DP, **(federation or {})}},
        **({"status": status} if status else {}),
    }


def test_charge_records_a_round_and_the_figures_follow_the_library():
    c = api.parse_cluster(body())
    spent = privacy_budget.charge(c, None)
    assert spent is not None and spent["ledger"] == [{"noiseMultiplier": 1.0, "rounds": 1}] and spent["delta"] == "1e-5"
    assert float(spent["epsilon"]) == pytest.approx(privacy.epsilon((privacy.Spend(1.0, 1),), 1e-5), rel=1e-3)
    again = privacy_budget.charge(c, {"privacy": spent})
    assert again is not None and again["ledger"] == [{"noiseMultiplier": 1.0, "rounds": 2}] and float(again["epsilon"]) > float(spent["epsilon"])
    assert again["roundsLeft"] == spent["roundsLeft"] - 1
    assert privacy_budget.charge(api.parse_cluster(body({"noiseMultiplier": "", "clipNorm": "", "epsilonBudget": ""})), None) is None


def test_refusal_once_one_more_round_would_pass_the_budget():
    c = api.parse_cluster(body())
    status: dict = {}
    started = 0
    while privacy_budget.refusal(c, status) is None:
        status = {"privacy": privacy_budget.charge(c, status)}
        started += 1
    assert started == privacy_budget.figures(c, privacy.EMPTY)["roundsLeft"] > 0
    assert float(status["privacy"]["epsilon"]) <= 10 and status["privacy"]["roundsLeft"] == 0
    message = privacy_budget.refusal(c, status)
    assert message is not None and "epsilonBudget 10" in message
    no_budget = api.parse_cluster(body({"epsilonBudget": ""}))
    assert privacy_budget.refusal(no_budget, status) is None and "roundsLeft" not in privacy_budget.figures(no_budget, privacy.EMPTY)


def test_a_round_past_the_budget_fails_before_any_agent_is_called(kube):
    spent = privacy.EMPTY
    for _ in range(20):
        spent = privacy.record(spent, 1.0)  # epsilon ~ 40, far past the budget of 10
    cluster = body()
    del cluster["metadata"]["uid"], cluster["metadata"]["generation"]
    kube.create(cluster)
    kube.patch_status(api.API_VERSION, api.CLUSTER_KIND, "default", "dp", {"privacy": {"ledger": privacy.to_json(spent)}})
    kube.create(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.ROUND_KIND,
            "metadata": {"name": "dp-round", "namespace": "default"},
            "spec": {"clusterRef": {"name": "dp"}},
        }
    )
    events, ended = [], []
    result = round_control.drive(
        kube, kube.get(api.API_VERSION, api.ROUND_KIND, "default", "dp-round"), stop=lambda: False, event=lambda *e: events.append(e), ended=ended.append
    )
    assert result is None and ended == ["Failed"]
    succeeded = next(c for c in kube.get(api.API_VERSION, api.ROUND_KIND, "default", "dp-round")["status"]["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "PrivacyBudgetSpent") and "epsilonBudget 10" in succeeded["message"]
    assert events[-1][:2] == ("Warning", "PrivacyBudgetSpent")
