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

import os

__version__ = "0.1.0"

# The agent and the CLI start other programs but never fork to go on running
# Python in the child. gRPC's fork support, on by default in the grpcio
# wheels, runs handlers in every fork()ed child; in a process where gRPC has
# started, a child forked for subprocess's preexec_fn can die of SIGABRT
# before it reaches exec(), silently. Off unless the environment says
# otherwise. It is set here, in the package every module of veer's is
# imported through, because gRPC reads it when `grpc` is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
