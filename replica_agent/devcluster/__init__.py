"""An emulated Kubernetes cluster for tests and for users without one.

- ``emulator.ApiEmulator``: the Kubernetes API (kmock-based) over HTTP on 127.0.0.1.
- ``kubelet.Kubelet``: StatefulSet/Deployment controllers and a kubelet that runs pods as local processes.
- ``cluster.DevCluster``: all of it together (+ CRDs, kubeconfig, the kopf operator); ``cluster.main`` is
  the ``collm dev-cluster up`` entry point.
"""
