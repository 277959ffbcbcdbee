"""Chaos on the dev cluster: faults injected while traffic flows and rounds run, in figures.

- ``traffic.py``: streaming clients through the router; each request classified by how it ended.
- ``observer.py``: what was published, how rounds ended, what each replica serves (polled).
- ``verdict.py``: half-applied versions defined and checked; the figures of a scenario (pure).
- ``scenarios.py``: the faults, injected for real (SIGKILL, SIGSTOP, a full volume, the pods' fault hook).
- ``runner.py``: the cluster, the run, the table and the JSON (``python -m e2e.chaos``).
"""
