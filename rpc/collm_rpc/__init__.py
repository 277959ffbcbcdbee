"""The wire contract between the operator and the replica agents: the gRPC protocol (proto/), its
client, the round driver that runs a federated round over it, and the typed stats it carries.

Depends on the control core (collm_control) and grpc only: the operator image carries this package
and no torch (tests/operator/test_torch_free.py)."""
