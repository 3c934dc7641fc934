"""The `veer` debug commands' side of the API: one call per command, answers
as plain dicts (the JSON form `-o json` prints and agent/cli/render.py draws).

Errors, translated here once:

    AgentUnreachable (VeerError)   no agent answers at the socket/address: exit code 3
    ApiError (VeerError)           the agent answered with an error status: exit code 1
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from agent.api import proto
from agent.defaults import DEFAULT_SOCKET
from agent.errors import VeerError

EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 3


class AgentUnreachable(VeerError):
    exit_code = EXIT_UNREACHABLE


class ApiError(VeerError):
    exit_code = EXIT_API_ERROR

    def __init__(self, code: str, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(details)


def message_to_dict(msg: Any) -> dict[str, Any]:
    """Every field of a message, defaults included, so the JSON/YAML output has
    one shape; unset sub-messages are None, enums their names, 64-bit
    integers stay integers (unlike protobuf's JSON mapping)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = [_value(f, v) for v in value]
        elif f.message_type is not None:
            out[f.name] = message_to_dict(value) if msg.HasField(f.name) else None
        else:
            out[f.name] = _value(f, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_to_dict(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


class Client:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, address: str = "",
                 timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.address = address
        self.timeout = timeout
        self.where = address or socket_path
        gen = proto.load()
        self.pb = gen.pb2
        self._channel = grpc.insecure_channel(address or f"unix:{socket_path}")
        self._stub = gen.grpc.AgentStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self) -> AgentUnreachable:
        if not self.address and os.path.exists(self.socket_path) and not os.access(
            self.socket_path, os.R_OK | os.W_OK
        ):
            return AgentUnreachable(
                f"permission denied on {self.socket_path}: the veer API is root only "
                "(run the command with sudo)"
            )
        return AgentUnreachable(f"no veer agent at {self.where} — is it running on this node?")

    def _call(self, method: str, request: Any, timeout: float | None = None) -> dict[str, Any]:
        if not self.address and not os.path.exists(self.socket_path):
            raise self._unreachable()
        try:
            answer = getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise self._translate(err) from None
        return message_to_dict(answer)

    def _translate(self, err: grpc.RpcError) -> VeerError:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        if code == grpc.StatusCode.UNAVAILABLE and "not delivered a complete view" not in (
            details or ""
        ):
            return self._unreachable()
        name = code.name if code is not None else "UNKNOWN"
        return ApiError(name, details or name)

    # ---- one method per command ------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._call("Status", self.pb.StatusRequest())

    def services(self, namespace: str = "") -> dict[str, Any]:
        return self._call("ListServices", self.pb.ListServicesRequest(namespace=namespace))

    def service(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(
            "GetService", self.pb.GetServiceRequest(namespace=namespace, name=name)
        )

    def conntrack(self, address: str = "", port: int = 0, limit: int = 0) -> dict[str, Any]:
        return self._call("Conntrack", self.pb.ConntrackRequest(address=address, port=port,
                                                                limit=limit))

    def explain(self, source: str, destination: str, port: int,
                protocol: str = "TCP", netns_cookie: int = 0) -> dict[str, Any]:
        return self._call("Explain", self.pb.ExplainRequest(
            source=source, destination=destination, port=port, protocol=protocol,
            client_netns_cookie=netns_cookie))

    def maps(self) -> dict[str, Any]:
        return self._call("Maps", self.pb.MapsRequest())

    def resync(self, timeout: float = 30.0) -> dict[str, Any]:
        return self._call("Resync", self.pb.ResyncRequest(timeout_seconds=timeout),
                          timeout=timeout + 5)

    def observe(
        self,
        namespace: str = "",
        service: str = "",
        verdicts: Sequence[str] = (),
        reasons: Sequence[str] = (),
        follow: bool = False,
        last: int = 0,
        on_start: Callable[[str], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Flow events. `verdicts` are Verdict names without the prefix
        (refuse, drop, ...). With `follow`, `on_start` is called once the agent
        has registered this client, with "traced" or "off" (whether
        translations are reported), and events stream until the caller stops."""
        if not self.address and not os.path.exists(self.socket_path):
            raise self._unreachable()
        request = self.pb.ObserveRequest(
            namespace=namespace, service=service, follow=follow, last=last,
            verdicts=[self.pb.Verdict.Value(f"VERDICT_{v.upper()}") for v in verdicts],
            reasons=list(reasons),
        )
        call = self._stub.Observe(request, timeout=None if follow else self.timeout)
        try:
            if follow and on_start is not None:
                metadata = dict(call.initial_metadata() or ())
                if metadata:
                    on_start(str(metadata.get("veer-translations", "")))
            for event in call:
                yield message_to_dict(event)
        except grpc.RpcError as err:
            raise self._translate(err) from None
        finally:
            call.cancel()  # the caller stopped reading: the agent lets go of us
