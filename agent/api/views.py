"""Agent state -> API messages (veer.v1), one function per answer.

Everything here reads: the snapshot (what the source delivered), the desired
state (what compute makes of it), the real maps (through a DatapathReader)
and the reconciler's record of failures. Nothing here writes.

The `pb` argument is the generated message module (agent.api.proto.load()).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

from agent.compute.desired import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    is_proxied,
)
from agent.compute.endpoints import endpoint_views
from agent.compute.render import render_desired
from agent.compute.types import (
    ComputeConfig,
    DesiredState,
    EmptyVerdict,
    Frontend,
    L4Addr,
    ServiceProblem,
)
from agent.datapath import flows
from agent.datapath.inspect import ActualState, FrontendView, NatFlow, SocketEntry
from agent.model.objects import IPAddress, IPFamily, Service, ServiceType
from agent.model.snapshot import ClusterSnapshot
from agent.telemetry import TelemetrySnapshot

from .explain import Explanation

# Lines of the desired text that no map holds; left out of the diff.
NOT_IN_MAPS = ("problem ", "healthcheck ")


def not_proxied_reason(svc: Service, config: ComputeConfig) -> str:
    """Why compute.is_proxied(svc) is False, in the order it checks."""
    labels = svc.meta.labels
    if SERVICE_PROXY_NAME_LABEL in labels:
        if config.service_proxy_name is None:
            return f"labelled {SERVICE_PROXY_NAME_LABEL}={labels[SERVICE_PROXY_NAME_LABEL]}: " \
                "left to another proxy"
        if labels[SERVICE_PROXY_NAME_LABEL] != config.service_proxy_name:
            return f"labelled {SERVICE_PROXY_NAME_LABEL}={labels[SERVICE_PROXY_NAME_LABEL]}, " \
                f"not {config.service_proxy_name}: left to another proxy"
    if HEADLESS_LABEL in labels:
        return f"labelled {HEADLESS_LABEL}: not proxied"
    if svc.type == ServiceType.EXTERNAL_NAME:
        return "type ExternalName: answered by DNS, not proxied"
    if svc.headless:
        return "headless (clusterIP: None): clients reach the pods directly"
    return "no cluster IP"


def problem_message(pb: Any, problem: ServiceProblem) -> Any:
    return pb.Problem(namespace=problem.namespace, name=problem.name, reason=problem.reason,
                      message=problem.message)


# ---- services ----------------------------------------------------------------


def _frontend_state(
    pb: Any, fe: Frontend, view: FrontendView | None, external: FrontendView | None,
    failed: Mapping[L4Addr, str],
) -> tuple[int, str]:
    if fe.key in failed:
        return pb.FRONTEND_STATE_FAILED, failed[fe.key]
    complete = view is not None and view.complete and (
        not fe.kind.external or (external is not None and external.complete))
    if complete and view is not None and _project(fe, view, external) == fe:
        return pb.FRONTEND_STATE_PROGRAMMED, ""
    return pb.FRONTEND_STATE_PENDING, ""


def frontend_message(
    pb: Any,
    fe: Frontend,
    svc: Service | None,
    snapshot: ClusterSnapshot,
    view: FrontendView | None,
    failed: Mapping[L4Addr, str],
    config: ComputeConfig,
    external: FrontendView | None = None,
) -> Any:
    state, error = _frontend_state(pb, fe, view, external, failed)
    msg = pb.Frontend(
        address=str(fe.key.address),
        port=fe.key.port,
        protocol=fe.key.protocol.value,
        kind=fe.kind.value,
        port_name=fe.service.port,
        service_port=str(fe.service),
        state=state,
        error=error,
        service_id=view.service_id if view else 0,
        programmed_backends=view.count if view else 0,
        on_empty=fe.on_empty.value,
        affinity_timeout_seconds=fe.affinity_timeout,
        policy=fe.policy,
        algorithm=fe.algorithm.value,
        policy_features=_policy_features(fe),
    )
    in_use = set(fe.backends)
    total = sum(fe.weights)
    share = {b: 100.0 * w / total for b, w in zip(fe.backends, fe.weights, strict=True)} \
        if total else {}
    programmed = set(view.backends) if view else set()
    listed: set[L4Addr] = set()
    port = None
    if svc is not None:
        port = next(
            (p for p in svc.ports
             if p.name == fe.service.port and p.protocol == fe.key.protocol),
            None,
        )
    if svc is not None and port is not None:
        # The slices compute reads (a slice labelled for another proxy is not).
        for ep in endpoint_views(snapshot, svc, port, IPFamily.of(fe.key.address), config):
            listed.add(ep.backend)
            msg.backends.append(pb.Backend(
                address=str(ep.backend.address), port=ep.backend.port,
                ready=ep.ready, serving=ep.serving, terminating=ep.terminating,
                in_use=ep.backend in in_use, programmed=ep.backend in programmed,
                node_name=ep.node_name, weight_percent=share.get(ep.backend, 0.0),
            ))
    # Backends the maps (or the desired state) hold that no EndpointSlice lists.
    for be in sorted((in_use | programmed) - listed):
        msg.backends.append(pb.Backend(
            address=str(be.address), port=be.port,
            in_use=be in in_use, programmed=be in programmed,
            weight_percent=share.get(be, 0.0),
        ))
    return msg


def _policy_features(fe: Frontend) -> list[str]:
    out = []
    if fe.access is not None:
        out.append("access")
    if fe.redirect is not None:
        out.append(f"redirect {fe.redirect}")
    if fe.sockmap:
        out.append("sockmap")
    return out


def service_messages(
    pb: Any,
    snapshot: ClusterSnapshot,
    desired: DesiredState,
    actual: ActualState,
    failed: Mapping[L4Addr, str],
    config: ComputeConfig,
    namespace: str = "",
    name: str = "",
) -> list[Any]:
    """ServiceInfo for every Service of the snapshot (or the one asked for)."""
    by_service: dict[tuple[str, str], list[Frontend]] = {}
    for fe in desired.frontends.values():
        by_service.setdefault((fe.service.namespace, fe.service.name), []).append(fe)
    out = []
    for (ns, nm), svc in sorted(snapshot.services.items()):
        if (namespace and ns != namespace) or (name and nm != name):
            continue
        proxied = is_proxied(svc, config)
        info = pb.ServiceInfo(
            namespace=ns, name=nm, type=svc.type.value, proxied=proxied,
            not_proxied_reason="" if proxied else not_proxied_reason(svc, config),
        )
        for fe in sorted(by_service.get((ns, nm), []), key=lambda f: f.key):
            info.frontends.append(
                frontend_message(pb, fe, svc, snapshot, actual.frontends.get(fe.key), failed,
                                 config, actual.external.get(fe.key))
            )
        info.problems.extend(
            problem_message(pb, p) for p in desired.problems if (p.namespace, p.name) == (ns, nm)
        )
        out.append(info)
    return out


# ---- conntrack -------------------------------------------------------------


def socket_messages(
    pb: Any,
    entries: list[SocketEntry],
    actual: ActualState,
    desired: DesiredState,
    address: IPAddress | None = None,
    port: int = 0,
) -> list[Any]:
    by_id = actual.by_service_id()
    out = []
    for e in sorted(entries, key=lambda e: (e.service_address.version, int(e.service_address),
                                              e.service_port, e.cookie)):
        if address is not None and address not in (e.backend_address, e.service_address):
            continue
        if port and port not in (e.backend_port, e.service_port):
            continue
        view = by_id.get(e.service_id)
        fe = desired.frontends.get(view.key) if view else None
        out.append(pb.SocketEntry(
            cookie=e.cookie,
            backend_address=str(e.backend_address), backend_port=e.backend_port,
            service_address=str(e.service_address), service_port=e.service_port,
            service_id=e.service_id, service=str(fe.service) if fe else "",
        ))
    return out


def flow_messages(
    pb: Any,
    nat_flows: list[NatFlow],
    actual: ActualState,
    desired: DesiredState,
    address: IPAddress | None = None,
    port: int = 0,
) -> list[Any]:
    """The per-packet flows that match (NatFlow.matches), by frontend then
    client. A flow is named after the frontend its service id has now only
    if that is still the frontend it was sent to: a freed id is handed out
    again at once."""
    by_id = actual.by_service_id()
    out = []
    for f in sorted(nat_flows, key=lambda f: (f.frontend_address.version, int(f.frontend_address),
                                          f.frontend_port, f.protocol,
                                          int(f.client_address), f.client_port)):
        if not f.matches(address, port):
            continue
        view = by_id.get(f.service_id) if f.service_id else None
        if view is not None and (view.key.address, view.key.port, view.key.protocol.value) != (
                f.frontend_address, f.frontend_port, f.protocol):
            view = None
        fe = desired.frontends.get(view.key) if view else None
        out.append(pb.NatFlow(
            protocol=f.protocol,
            client_address=str(f.client_address), client_port=f.client_port,
            frontend_address=str(f.frontend_address), frontend_port=f.frontend_port,
            source_address=str(f.source_address), source_port=f.source_port,
            backend_address=str(f.backend_address), backend_port=f.backend_port,
            service_id=f.service_id, service=str(fe.service) if fe else "",
            flags=list(f.flags), idle_seconds=f.idle_seconds,
        ))
    return out


# ---- explain -----------------------------------------------------------------

VERDICTS = {
    "translate": "VERDICT_TRANSLATE",
    "refuse": "VERDICT_REFUSE",
    "unreachable": "VERDICT_UNREACHABLE",
    "pass": "VERDICT_PASS",
}


def explain_message(pb: Any, ex: Explanation) -> Any:
    msg = pb.ExplainResponse(
        verdict=getattr(pb, VERDICTS[ex.verdict]),
        reason=ex.reason, summary=ex.summary, steps=ex.steps, counter=ex.counter,
        errno=ex.errno, service_cidr=ex.service_cidr, served_ports=ex.served_ports,
        program=ex.program,
    )
    if ex.frontend is not None:
        f = ex.frontend
        msg.frontend.CopyFrom(pb.ExplainFrontend(
            address=str(f.key.address), port=f.key.port, protocol=f.key.protocol.value,
            service_id=f.service_id, count=f.count, service_port=f.service_port, kind=f.kind,
            affinity_timeout_seconds=f.affinity_timeout, drop_when_empty=f.drop_when_empty,
        ))
    for c in ex.candidates:
        msg.candidates.append(pb.Candidate(
            slot=c.slot, backend_id=c.backend_id, address=str(c.backend.address),
            port=c.backend.port, probability=c.probability,
        ))
    return msg


# ---- maps --------------------------------------------------------------------


def _project(want: Frontend, view: FrontendView, external: FrontendView | None) -> Frontend:
    """`want` with what the maps hold in place of what it asks for."""
    def verdict(drop: bool) -> EmptyVerdict:
        return EmptyVerdict.DROP if drop else EmptyVerdict.REFUSE

    held = dataclasses.replace(
        want, backends=view.backends, on_empty=verdict(view.drop_when_empty),
        affinity_timeout=view.affinity_timeout,
    )
    if not want.kind.external:
        return held
    if external is None:  # the external scope is missing: nothing serves outside traffic
        return dataclasses.replace(held, external_backends=(),
                                   external_on_empty=EmptyVerdict.REFUSE, external_local=False)
    return dataclasses.replace(
        held, external_backends=external.backends,
        external_on_empty=verdict(external.drop_when_empty),
        external_local=external.external_local,
    )


def _broken(view: FrontendView, scope: str) -> list[str]:
    out = []
    for s in view.slots:
        if s.backend is None:
            what = "missing" if not s.backend_id else f"backend {s.backend_id} missing"
            out.append(f"inconsistent {view.key}{scope} slot {s.slot}: {what}")
    return out


def actual_text(actual: ActualState, desired: DesiredState) -> str:
    """The real maps in render_desired's format.

    From the maps: which frontends exist, their backends (through the slots)
    in the socket scope and, for NodePort/ExternalIP/LoadBalancer, in the
    external scope; the drop-when-empty, affinity and external-Local flags;
    the VIPs and CIDRs. A frontend's Service name and kind, and its source
    ranges, are not in these maps: they are taken from the desired frontend
    with the same key, so the diff shows exactly what the maps get wrong.
    Frontends nobody wants are shown with their service id; frontends with
    missing slots or backends get an `inconsistent` line.
    """
    known: dict[L4Addr, Frontend] = {}
    strays: list[str] = []
    broken: list[str] = []
    for key in sorted(actual.frontends):
        view = actual.frontends[key]
        external = actual.external.get(key)
        want = desired.frontends.get(key)
        if want is not None:
            known[key] = _project(want, view, external)
        else:
            empty = "drop" if view.drop_when_empty else "refuse"
            backends = " ".join(str(b) for b in view.backends) or f"(none: {empty})"
            strays.append(f"{key}  ?  (not desired: service id {view.service_id})  -> {backends}")
        broken += _broken(view, "")
        if external is not None:
            broken += _broken(external, " (external)")
    for key in sorted(set(actual.external) - set(actual.frontends)):
        view = actual.external[key]
        strays.append(f"{key}  ?  (external scope only: service id {view.service_id})  "
                      f"-> {' '.join(str(b) for b in view.backends) or '(none)'}")
        broken += _broken(view, " (external)")
    text = render_desired(DesiredState(
        frontends=known, vips=frozenset(actual.vips),
        service_cidrs=frozenset(actual.service_cidrs),
    ))
    return text + "".join(f"{line}\n" for line in (*strays, *broken))


def maps_message(pb: Any, desired: DesiredState, actual: ActualState, bpffs: str) -> Any:
    desired_text = render_desired(desired)
    comparable = "".join(
        line for line in desired_text.splitlines(keepends=True)
        if not line.startswith(NOT_IN_MAPS)
    )
    actual_txt = actual_text(actual, desired)
    diff = "".join(difflib.unified_diff(
        comparable.splitlines(keepends=True), actual_txt.splitlines(keepends=True),
        fromfile="desired", tofile="actual",
    ))
    return pb.MapsResponse(desired=desired_text, actual=actual_txt, diff=diff,
                           in_sync=not diff, bpffs=bpffs)


# ---- status ------------------------------------------------------------------


def sync_message(pb: Any, t: TelemetrySnapshot) -> Any | None:
    if t.last is None:
        return None
    return pb.SyncStatus(
        last_time=t.last.end_time,
        last_duration_seconds=t.last.duration,
        last_full=t.last.full,
        last_changes=t.last.changes,
        last_errors=list(t.last.errors),
        last_success_time=t.last_success_time,
        last_full_time=t.last_full_time,
        passes=t.passes,
        failed_passes=t.failed_passes,
    )


def kernel_release() -> str:
    return os.uname().release


# ---- observe -----------------------------------------------------------------

FLOW_VERDICTS = {
    flows.TRANSLATE: "VERDICT_TRANSLATE",
    flows.REFUSE: "VERDICT_REFUSE",
    flows.UNREACHABLE: "VERDICT_UNREACHABLE",
    flows.DROP: "VERDICT_DROP",
    flows.DENY: "VERDICT_DENY",
}


def flow_filter(pb: Any, request: Any) -> flows.FlowFilter:
    """The ObserveRequest's filter; ValueError names what is wrong with it."""
    names = {getattr(pb, v): k for k, v in FLOW_VERDICTS.items()}
    verdicts = set()
    for value in request.verdicts:
        if value not in names:
            raise ValueError(f"verdict {pb.Verdict.Name(value)} is never reported as a flow event")
        verdicts.add(names[value])
    return flows.FlowFilter(namespace=request.namespace, service=request.service,
                            verdicts=frozenset(verdicts | set(request.reasons)))


def flow_message(pb: Any, e: flows.FlowEvent, lost_before: int = 0) -> Any:
    backend = e.backend
    return pb.FlowEvent(
        time=e.time,
        verdict=getattr(pb, FLOW_VERDICTS.get(e.verdict, "VERDICT_UNSPECIFIED")),
        reason=e.reason,
        reason_text=e.info.text,
        errno=e.errno,
        hook=e.hook,
        source=str(e.source) if e.source is not None else "",
        source_port=e.source_port,
        destination=str(e.destination),
        port=e.port,
        protocol=e.protocol,
        backend_address=str(backend.address) if backend is not None else "",
        backend_port=backend.port if backend is not None else 0,
        service_port=e.service_port,
        namespace=e.namespace,
        name=e.name,
        service_id=e.service_id,
        cookie=e.cookie,
        pid=e.pid,
        comm=e.comm,
        netns_cookie=e.netns,
        flags=list(e.flags),
        lost_before=lost_before,
        access_rule=(f"access.rules[{e.rule}]" if e.rule is not None
                     else "access.defaultAction" if e.access_default else ""),
    )
