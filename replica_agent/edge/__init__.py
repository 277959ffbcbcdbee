"""Cloud-edge collaborative inference (CE-CoLLM): an edge device runs the first layers of the
replica's model and adapter and emits the tokens its early-exit head is sure of; a replica finishes
the others from the boundary hidden states the edge streams up (docs/cloud-edge.md)."""
