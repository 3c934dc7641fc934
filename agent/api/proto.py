"""The Python code generated from veer.proto, imported on first use.

The code is generated at build time (scripts/gen-proto.sh, which
scripts/setup.sh runs) into agent/api/gen/, which is not committed. Importing
it lazily keeps every other command (and `veer agent` without an API) working
when it is missing, and turns its absence into one message that says what to
run. The modules are typed as Any: mypy does not read generated code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from agent.errors import EnvironmentProblem

GEN_PACKAGE = "agent.api.gen"


@dataclass(frozen=True)
class Generated:
    pb2: Any  # messages and enums (veer_pb2)
    grpc: Any  # AgentStub, add_AgentServicer_to_server (veer_pb2_grpc)


_loaded: Generated | None = None


def load() -> Generated:
    """The generated modules; EnvironmentProblem naming the fix if they are missing."""
    global _loaded
    if _loaded is None:
        try:
            pb2 = importlib.import_module(f"{GEN_PACKAGE}.veer_pb2")
            grpc = importlib.import_module(f"{GEN_PACKAGE}.veer_pb2_grpc")
        except ImportError as err:
            raise EnvironmentProblem(
                "the gRPC code generated from agent/api/veer.proto is missing or broken "
                f"({err}); run scripts/gen-proto.sh (scripts/setup.sh does) and try again"
            ) from err
        _loaded = Generated(pb2, grpc)
    return _loaded
