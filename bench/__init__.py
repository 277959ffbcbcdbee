"""Benchmark drivers behind ``collm bench ...`` (imported as ``collm_bench``)."""
