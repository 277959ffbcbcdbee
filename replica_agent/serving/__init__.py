"""The agent's servers: TGI-compatible HTTP API and Prometheus metrics."""
