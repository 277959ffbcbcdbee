"""The CoLLM Kubernetes operator (imported as ``collm_operator``; ``operator`` is a standard-library module)."""
