"""A cluster's privacy budget as the operator keeps it: the accountant's ledger in status.privacy,
what one more DP round would spend, and the status figures (collm_control.privacy does the maths).

Epsilon is spent when a round starts, not when it publishes: an aggregate that fails the eval gate
was still computed from the participants' updates and evaluated on their held-out data, so a
conservative accountant charges every round that ran with noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from collm_control import privacy
from collm_operator import api


def ledger(status: Mapping[str, Any] | None) -> privacy.Ledger:
    return privacy.from_json(((status or {}).get("privacy") or {}).get("ledger"))


def refusal(cluster: api.Cluster, status: Mapping[str, Any] | None) -> str | None:
    """Why no further round may start (the budget would be exceeded), or None."""
    f = cluster.spec.federation
    if not (f.noise_multiplier and f.epsilon_budget):
        return None
    spent = ledger(status)
    z, delta, budget = float(f.noise_multiplier), float(f.privacy_delta), float(f.epsilon_budget)
    if privacy.allows(spent, z, delta, budget):
        return None
    return (
        f"one more round with noiseMultiplier {f.noise_multiplier} would take epsilon from {privacy.epsilon(spent, delta):.3g} "
        f"above spec.federation.epsilonBudget {f.epsilon_budget} (delta {f.privacy_delta}); no round starts: raise the budget "
        "or the noise multiplier, or accept that this cluster's private data has given what it may"
    )


def figures(cluster: api.Cluster, spent: privacy.Ledger) -> dict[str, Any]:
    """status.privacy for the ledger `spent`."""
    f = cluster.spec.federation
    delta = float(f.privacy_delta)
    out: dict[str, Any] = {"ledger": privacy.to_json(spent), "epsilon": f"{privacy.epsilon(spent, delta):.4g}", "delta": f.privacy_delta}
    if f.noise_multiplier and f.epsilon_budget:
        out["roundsLeft"] = privacy.rounds_left(spent, float(f.noise_multiplier), delta, float(f.epsilon_budget))
    return out


def charge(cluster: api.Cluster, status: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """status.privacy after one more round starts; None for a cluster without DP noise (nothing spent)."""
    if not cluster.spec.federation.noise_multiplier:
        return None
    return figures(cluster, privacy.record(ledger(status), float(cluster.spec.federation.noise_multiplier)))
