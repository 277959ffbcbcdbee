"""End to end: the emulated Kubernetes cluster (devcluster/: API emulator on kmock, kubelet stand-in),
the harness that runs the operator's scenarios on it or on a real cluster, and the scenarios.
Development only: nothing shipped imports it, and it is not installed (run it from the repository)."""
