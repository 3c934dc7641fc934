"""veer: an eBPF replacement for kube-proxy.

The package is laid out along the data flow (see ARCHITECTURE in the repo):

    sources/    record cluster state (a manifest directory; Kubernetes later)
    model/      typed, immutable Kubernetes objects and the ClusterSnapshot
    compute/    pure: snapshot + node identity -> DesiredState
    reconcile/  diff desired vs actual, apply the delta, bounded-frequency runs
    datapath/   the backends that program the kernel (eBPF, fake)
    cli/        the `veer` command
    sandbox/    a one-machine demo topology, also used by the tests
"""

__version__ = "0.1.0"
