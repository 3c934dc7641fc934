"""The one exception root of veer, and its branches.

    VeerError                      anything veer raises on purpose
    ├── ModelError                 a Kubernetes object is malformed (names object and field)
    ├── ManifestError              a manifest file cannot be read or parsed (names the file)
    ├── ConfigError                the agent was started with options it cannot honour
    ├── EnvironmentProblem         the machine lacks something (root, bpffs, cgroup2, BPF)
    ├── KubeApiError               a Kubernetes API request failed (HTTP status, 0: no answer)
    └── DatapathError              the kernel refused an operation (names the object)
        └── MapFullError           a map has no room left

Lower-level errors (OSError from bpf(2), yaml errors, ...) are translated into
these at the module that talks to the lower level, so callers above handle one
family and users read messages that say what to do.
"""

from __future__ import annotations


class VeerError(Exception):
    """Root of every error veer raises on purpose."""


class ModelError(VeerError):
    """A Kubernetes object cannot be turned into the model.

    `obj` names the object as kind/namespace/name, `field` is a JSON-path-like
    location inside it ("spec.ports[1].port").
    """

    def __init__(self, obj: str, field: str, message: str) -> None:
        self.obj = obj
        self.field = field
        self.message = message
        super().__init__(f"{obj}: {field}: {message}")


class ManifestError(VeerError):
    """A manifest file cannot be read or parsed."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class ConfigError(VeerError):
    """The agent was asked for something it cannot do (bad flag, unsupported mode)."""


class EnvironmentProblem(VeerError):
    """The machine lacks something veer needs; the message says what and how to fix it."""


class KubeApiError(VeerError):
    """A request to the Kubernetes API failed.

    `status` is the HTTP status (404, 410, ...), 0 when no answer came (the
    server could not be reached, the connection broke, a timeout); `reason`
    is the API's reason ("NotFound", "Expired", ...) when it gave one.
    """

    def __init__(self, what: str, status: int, message: str, reason: str = "") -> None:
        self.what = what
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{what}: {message}" if status == 0 else f"{what}: {status} {message}")


class DatapathError(VeerError):
    """The kernel refused a datapath operation."""


class MapFullError(DatapathError):
    """A BPF map has no room for another entry."""
