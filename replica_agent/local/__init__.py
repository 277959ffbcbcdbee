"""Local mode: several agents, the router and the slow-timescale controller in one process (demo, benchmarks)."""
