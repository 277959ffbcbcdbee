"""An emulated Kubernetes cluster for tests and for users without one.

- ``emulator.ApiEmulator``: the Kubernetes API (kmock-based) over HTTP on 127.0.0.1.
  Its parts: ``http_api`` (requests, discovery, watches), ``patching``, ``matching``, ``tables``
  (server-side Tables for kubectl) and ``errors`` (``ApiError``).
- ``kubelet.Kubelet``: StatefulSet/Deployment controllers and a kubelet that runs pods as local processes.
  ``dns_hook.py`` is the cluster DNS hook it copies into pods as ``sitecustomize.py`` (never imported).
- ``cluster.DevCluster``: all of it together (+ CRDs, kubeconfig, the kopf operator); ``cluster.main`` is
  the ``python -m e2e.devcluster up`` entry point.
"""
