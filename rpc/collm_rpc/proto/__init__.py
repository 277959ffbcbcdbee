"""The agent's gRPC protocol: collm.proto and its generated code."""
