"""Federated rounds: update encoding, aggregation strategies, privacy, the round state machine."""
