"""When a replica serves what it has learnt: the local-revision cadence and gate (pure, stdlib only).

The shadow adapter trains continuously in the budget the batch mixer grants. Every `every_steps`
training steps or `every_s` seconds (whichever comes first; 0 turns a trigger off) the trainer
evaluates the shadow on the replica's held-out split and publishes it as a local revision when it
passes the gate: not worse than what the replica serves, within `tolerance` nats. That is the rule
of the federated round's eval gate (rounds.py), applied to the replica's own progress; with the
default tolerance of 0 a revision never serves a higher held-out loss than the version it replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RevisionSettings:
    every_steps: int = 0
    every_s: float = 10.0
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.every_steps, int) or self.every_steps < 0:
            raise ValueError(f"every_steps must be an integer >= 0 (0: not by steps), got {self.every_steps!r}")
        if not (isinstance(self.every_s, (int, float)) and math.isfinite(self.every_s) and self.every_s >= 0):
            raise ValueError(f"every_s must be a number of seconds >= 0 (0: not by time), got {self.every_s!r}")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a number of nats >= 0, got {self.tolerance!r}")

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_s > 0


def revision_due(settings: RevisionSettings, steps_since: int, seconds_since: float) -> bool:
    """Is it time to evaluate the shadow? Never without a training step since the last check."""
    if steps_since < 1 or not settings.enabled:
        return False
    by_steps = settings.every_steps > 0 and steps_since >= settings.every_steps
    by_time = settings.every_s > 0 and seconds_since >= settings.every_s
    return by_steps or by_time


def passes_gate(candidate_loss: float, served_loss: float | None, tolerance: float) -> bool:
    """The eval gate: candidate <= served + tolerance (nats). A non-finite candidate never passes;
    with nothing measured for the served version (None or not finite) any finite candidate does."""
    if not math.isfinite(candidate_loss):
        return False
    if served_loss is None or not math.isfinite(served_loss):
        return True
    return candidate_loss <= served_loss + tolerance
