"""The CoLLM Kubernetes operator (kopf layer in main.py, pure modules beside it).

It lives in operator/collm_operator/ rather than in operator/ itself: a package directory named
`operator` at the repository root would shadow the standard library's `operator` module for any
`python -m ...` started there.
"""
