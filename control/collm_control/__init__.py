"""The control core: the slow timescale's pure decisions (load prediction, allocation, planning,
`decide()`), shared by the operator and the local mode. It imports neither Kubernetes nor torch
nor gRPC (tests/control/test_imports.py)."""
