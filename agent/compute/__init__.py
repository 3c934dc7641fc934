"""Pure computation of the desired datapath state: no I/O, no kernel, no clock."""

from agent.compute.desired import compute_desired
from agent.compute.types import (
    ComputeConfig,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    NodeIdentity,
    ServiceProblem,
)

__all__ = [
    "ComputeConfig",
    "DesiredState",
    "Frontend",
    "FrontendKind",
    "L4Addr",
    "NodeIdentity",
    "ServiceProblem",
    "compute_desired",
]
