"""The `veer` debug commands' output: API answers (as dicts) -> text.

Pure functions, tested with golden files (tests/unit/test_cli_render.py).
Tables are kubectl-style: upper-case headers, columns left-aligned and
separated by two spaces, no borders. Times are absolute (UTC) with their
age relative to `now`, which callers pass so that output is reproducible.
`-o json` and `-o yaml` print the dicts themselves (`render_data`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")


# ---- building blocks -----------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Aligned columns; the last column is not padded."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append(indent + "  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def fields(pairs: Sequence[tuple[str, object]], indent: str = "") -> str:
    """`label:  value` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "".join(f"{indent}{(k + ':').ljust(width)}  {v}\n" for k, v in pairs)


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def l4(address: str, port: int, protocol: str) -> str:
    return f"{host_port(address, port)}/{protocol}"


def when(timestamp: float, now: float) -> str:
    """`2026-11-25 22:06:14 UTC (3s ago)`; `never` for 0."""
    if not timestamp:
        return "never"
    at = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return f"{at:%Y-%m-%d %H:%M:%S} UTC ({age(now - timestamp)} ago)"


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def enum_name(value: str, prefix: str) -> str:
    return value.removeprefix(prefix).lower()


def render_data(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    return str(yaml.safe_dump(data, sort_keys=True, default_flow_style=False))


# ---- veer status -----------------------------------------------------------------


def _sync_lines(sync: dict[str, Any] | None, now: float) -> list[tuple[str, object]]:
    if sync is None:
        return [("last sync", "none yet")]
    errors = sync["last_errors"]
    outcome = "ok" if not errors else f"{plural(len(errors), 'error')}"
    return [
        ("last sync", f"{when(sync['last_time'], now)}, "
                      f"{'full' if sync['last_full'] else 'incremental'}, "
                      f"{duration(sync['last_duration_seconds'])}, "
                      f"{plural(sync['last_changes'], 'change')}, {outcome}"),
        ("last full sync", when(sync["last_full_time"], now)),
        ("last success", when(sync["last_success_time"], now)),
        ("passes", f"{sync['passes']} ({sync['failed_passes']} failed)"),
    ]


def render_status(s: dict[str, Any], now: float) -> str:
    source = s["source"] or {}
    synced = "synced" if source.get("synced") else "NOT SYNCED (nothing is programmed yet)"
    out = f"veer {s['version']} agent on node {s['node_name']}, up {age(now - s['start_time'])}\n"
    pairs: list[tuple[str, object]] = [
        ("mode", f"{s['mode']} ({s['mode_reason']})" if s["mode_reason"] else s["mode"]),
        ("datapath", f"{s['datapath']}, kernel {s['kernel']}"),
    ]
    found, missing = s.get("features_found") or [], s.get("features_missing") or []
    if found or missing:
        pairs.append(("kernel features", f"{len(found)} found, "
                      + (f"missing: {', '.join(missing)}" if missing else "none missing")))
    if s.get("sockmap"):
        pairs.append(("sockmap", s["sockmap"]))
    if s["cgroup"]:
        pairs.append(("cgroup", s["cgroup"]))
    pairs += [
        ("bpffs", s["bpffs"]),
        ("source", f"{source.get('kind', '?')} {source.get('location', '')}: {synced}, "
                   f"{plural(source.get('files', 0), 'file')}, "
                   f"{plural(source.get('objects', 0), 'object')}"),
        *_sync_lines(s["sync"], now),
        ("frontends", f"{s['frontends']} desired, {s['frontends_failed']} failed"),
    ]
    out += fields(pairs)
    if s["sync"] and s["sync"]["last_errors"]:
        out += "\nERRORS OF THE LAST SYNC\n"
        out += "".join(f"  {e}\n" for e in s["sync"]["last_errors"])

    programs = s["programs"]
    out += f"\nPROGRAMS ({plural(len(programs), 'program')} attached)\n"
    if programs:
        out += table(["HOOK", "ID", "NAME"],
                     [[p["hook"], p["id"], p["name"]] for p in programs], "  ")
    else:
        out += "  none\n"

    out += "\nMAPS\n"
    out += table(
        ["NAME", "ENTRIES", "CAPACITY", "USED"],
        [[m["name"], m["entries"], m["capacity"],
          f"{100 * m['entries'] / m['capacity']:.1f}%" if m["capacity"] else "-"]
         for m in s["maps"]],
        "  ",
    ) if s["maps"] else "  none\n"

    out += "\nKERNEL COUNTERS (veer_counters, summed over CPUs, since the map was created)\n"
    out += table(["EVENT", "COUNT"], [[c["name"], c["value"]] for c in s["counters"]], "  ") \
        if s["counters"] else "  none\n"

    out += "\nSKIPPED SERVICES\n"
    out += table(
        ["SERVICE", "REASON", "MESSAGE"],
        [[f"{p['namespace']}/{p['name']}", p["reason"], p["message"]] for p in s["skipped"]],
        "  ",
    ) if s["skipped"] else "  none\n"

    problems = source.get("problems", [])
    out += "\nMANIFEST PROBLEMS\n"
    out += "".join(f"  {p}\n" for p in problems) if problems else "  none\n"
    return out


# ---- veer services / veer service ----------------------------------------------------

STATE_PREFIX = "FRONTEND_STATE_"


def _frontend_state(fe: dict[str, Any]) -> str:
    state = enum_name(fe["state"], STATE_PREFIX)
    return f"failed: {fe['error']}" if state == "failed" and fe["error"] else state


def _backend_summary(fe: dict[str, Any]) -> str:
    in_use = [b for b in fe["backends"] if b["in_use"]]
    idle = [b for b in fe["backends"] if not b["in_use"]]
    text = " ".join(host_port(b["address"], b["port"]) for b in in_use)
    if not in_use:
        text = f"none ({fe['on_empty']})"
    if idle:
        not_ready = sum(1 for b in idle if not b["ready"])
        others = len(idle) - not_ready
        extra = [f"{not_ready} not ready"] if not_ready else []
        extra += [f"{others} unused"] if others else []
        text += f" (+{', '.join(extra)})"
    return text


def render_services(services: list[dict[str, Any]]) -> str:
    rows = []
    for svc in services:
        name = f"{svc['namespace']}/{svc['name']}"
        if not svc["proxied"]:
            rows.append([name, svc["type"], "-", "-", "not proxied", svc["not_proxied_reason"]])
            continue
        for fe in svc["frontends"]:
            rows.append([
                name, fe["kind"], l4(fe["address"], fe["port"], fe["protocol"]),
                fe["port_name"] or "-", _frontend_state(fe), _backend_summary(fe),
            ])
        for p in svc["problems"]:
            rows.append([name, svc["type"], "-", "-", "skipped", f"{p['reason']}: {p['message']}"])
        if not svc["frontends"] and not svc["problems"]:
            rows.append([name, svc["type"], "-", "-", "no frontends", "-"])
    if not rows:
        return "no Services\n"
    return table(["SERVICE", "KIND", "FRONTEND", "PORT", "STATE", "BACKENDS"], rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _empty_sentence(fe: dict[str, Any]) -> str:
    if fe["on_empty"] == "drop":
        return ("no usable backend: new connections fail with EHOSTUNREACH "
                "(endpoints exist, but none for this traffic)")
    return "no backends: new connections are refused at once (ECONNREFUSED)"


def render_service(svc: dict[str, Any]) -> str:
    out = f"Service {svc['namespace']}/{svc['name']} ({svc['type']})\n"
    if not svc["proxied"]:
        return out + f"  not proxied: {svc['not_proxied_reason']}\n"
    for p in svc["problems"]:
        out += f"  skipped: {p['reason']}: {p['message']}\n"
    if not svc["frontends"]:
        out += "  no frontends\n"
    for fe in svc["frontends"]:
        where = (f"service id {fe['service_id']}, {plural(fe['programmed_backends'], 'slot')}"
                 if fe["service_id"] else "not in the maps")
        out += (f"\n{l4(fe['address'], fe['port'], fe['protocol'])}  {fe['kind']}  "
                f"port {fe['port_name'] or '-'}  {_frontend_state(fe)} ({where})\n")
        if fe["affinity_timeout_seconds"]:
            out += f"  session affinity: ClientIP, {fe['affinity_timeout_seconds']}s\n"
        if fe.get("policy"):
            extra = "".join(f", {f}" for f in fe.get("policy_features") or [])
            out += f"  TrafficPolicy {fe['policy']}: {fe['algorithm']}{extra}\n"
        if not any(b["in_use"] for b in fe["backends"]):
            out += f"  {_empty_sentence(fe)}\n"
        if fe["backends"]:
            rows = []
            for b in fe["backends"]:
                use = ("in use" if b["in_use"] else "unused") + (
                    ", programmed" if b["programmed"] else "")
                if b.get("weight_percent"):
                    use += f", {b['weight_percent']:.1f}% of connections"
                rows.append([host_port(b["address"], b["port"]), _yes(b["ready"]),
                             _yes(b["serving"]), _yes(b["terminating"]),
                             b["node_name"] or "-", use])
            out += table(["BACKEND", "READY", "SERVING", "TERMINATING", "NODE", "USE"], rows,
                         "  ")
    return out


# ---- veer conntrack ---------------------------------------------------------------


def render_conntrack(c: dict[str, Any]) -> str:
    sockets = c["sockets"]
    out = ""
    if sockets:
        out += table(
            ["COOKIE", "SERVICE-ADDRESS", "BACKEND", "SERVICE"],
            [[s["cookie"], host_port(s["service_address"], s["service_port"]),
              host_port(s["backend_address"], s["backend_port"]),
              s["service"] or f"(service id {s['service_id']}, gone)"] for s in sockets],
        )
    out += (
        f"{plural(len(sockets), 'socket entry', 'socket entries')}: connected TCP sockets in "
        f"veer_sock_peers ({c['capacity']} slots by socket cookie), others in veer_sock_revnat "
        f"(LRU, capacity {c['capacity']}); entries outlive their sockets until reused or "
        "evicted.\n"
    )
    if not c.get("flows_capacity"):  # no flow table (an older agent, a TPROXY node)
        return out
    flows = c["flows"]
    if flows:
        out += "\n" + table(
            ["PROTO", "CLIENT", "FRONTEND", "SOURCE", "BACKEND", "SERVICE", "STATE", "IDLE"],
            [[f["protocol"], host_port(f["client_address"], f["client_port"]),
              host_port(f["frontend_address"], f["frontend_port"]),
              host_port(f["source_address"], f["source_port"]),
              host_port(f["backend_address"], f["backend_port"]),
              _flow_service(f), ",".join(f["flags"]) or "open",
              f"{f['idle_seconds']:.0f}s"] for f in flows],
        )
    elif sockets:
        out += "\n"
    total = int(c.get("flows_total") or len(flows))
    shown = f" (the first {len(flows)}: --limit)" if total > len(flows) else ""
    out += (
        f"{plural(total, 'per-packet flow', 'per-packet flows')}{shown} in veer_nat_fwd (LRU, "
        f"capacity {c['flows_capacity']}; ended flows stay until evicted): traffic from "
        "outside to NodePorts, externalIPs and LoadBalancer IPs, pods reaching a Local "
        "Service through another node's address, and the node's own connections moved off "
        "a source-NATed flow's port; SOURCE is the node's address when the flow is "
        "source-NATed. The socket programs NAT no packet: their connections are the sockets "
        "above.\n"
    )
    return out


def _flow_service(f: dict[str, Any]) -> str:
    if f["service"]:
        return str(f["service"])
    if not f["service_id"]:
        return "(the node's own, moved off a source-NATed flow's port)"
    return f"(service id {f['service_id']}, gone)"


# ---- veer explain --------------------------------------------------------------------

VERDICT_PREFIX = "VERDICT_"


def render_explain(e: dict[str, Any], destination: str, source: str = "") -> str:
    verdict = enum_name(e["verdict"], VERDICT_PREFIX).upper()
    head = destination + (f" from {source}" if source else "")
    out = f"{head}: {verdict}\n  {e['summary']}\n"
    out += f"\nprogram: {e['program']}\n"
    out += "checks, in the program's order:\n"
    out += "".join(f"  {i}. {step}\n" for i, step in enumerate(e["steps"], start=1))
    if e["candidates"]:
        out += "\ncandidates (the share of the slots each holds; how one is picked: above):\n"
        out += table(
            ["SLOT", "BACKEND-ID", "BACKEND", "SHARE"],
            [[c["slot"], c["backend_id"], host_port(c["address"], c["port"]),
              f"{100 * c['probability']:.1f}%"] for c in e["candidates"]],
            "  ",
        )
    tail = []
    if e["counter"]:
        tail.append(("counter", e["counter"]))
    if e["errno"]:
        tail.append(("errno", e["errno"]))
    if tail:
        out += "\n" + fields(tail)
    if source:
        out += ("\nnote: the socket programs decide before a source address is chosen; "
                "the source matters only to TrafficPolicy access rules, which know the "
                "client by its network namespace's address.\n")
    return out


# ---- veer maps / veer resync ---------------------------------------------------------------


def render_maps(m: dict[str, Any], diff_only: bool) -> str:
    if diff_only:
        if m["in_sync"]:
            return "no difference: the maps hold exactly the desired state\n"
        return str(m["diff"])
    empty = "(empty)\n"
    verdict = "in sync" if m["in_sync"] else "DIFFERENT: veer maps --diff shows how"
    return (
        "# desired: computed by the agent from its source\n"
        f"{m['desired'] or empty}"
        f"\n# actual: read back from the maps pinned in {m['bpffs']}\n"
        f"{m['actual'] or empty}"
        f"\n# {verdict}\n"
    )


def render_resync(r: dict[str, Any], now: float) -> str:
    sync = r["sync"]
    if sync is None:
        return "resync requested\n"
    errors = sync["last_errors"]
    out = (f"full resync done at {when(sync['last_time'], now)}: "
           f"{duration(sync['last_duration_seconds'])}, "
           f"{plural(sync['last_changes'], 'change')}"
           f"{', ok' if not errors else ', ' + plural(len(errors), 'error')}\n")
    out += "".join(f"  {e}\n" for e in errors)
    return out


# ---- veer observe --------------------------------------------------------------------

# Columns of a flow event line: fixed widths, so that a followed stream lines
# up without knowing what comes next (a longer value pushes the rest right).
FLOW_COLUMNS = (("TIME (UTC)", 12), ("VERDICT", 11), ("SERVICE", 22), ("DESTINATION", 20),
                ("BACKEND", 20), ("CLIENT", 22), ("REASON", 0))
FLOW_FLAGS = {
    "affinity": "backend kept by session affinity",
    "snat": "source-NATed to the node",
    "short_circuit": "pod client of a Local Service, served cluster-wide",
    "ipv4_mapped": "IPv4-mapped address on an IPv6 socket",
    "redirect": "sent to the node-local proxy (TrafficPolicy redirect)",
    "dsr": "sent to the backend's node by DSR: it answers the client itself",
}


def _flow_row(cells: Sequence[str]) -> str:
    out = ""
    for (_, width), cell in zip(FLOW_COLUMNS, cells, strict=True):
        out += cell.ljust(width) + "  " if width else cell
    return out.rstrip() + "\n"


def render_flow_header() -> str:
    return _flow_row([name for name, _ in FLOW_COLUMNS])


def flow_client(e: dict[str, Any]) -> str:
    """Who connected: the client's address (per-packet path) or, for the socket
    hooks, which run before a source address exists, the calling process."""
    if e["source"] and e["source_port"]:
        return host_port(e["source"], e["source_port"])
    if e["source"]:  # a socket hook that learnt the address from the client's namespace
        return str(e["source"]) + (f" {e['comm'] or '?'}[{e['pid']}]" if e["pid"] else "")
    if e["pid"]:
        return f"{e['comm'] or '?'}[{e['pid']}]"
    return "-"


def flow_reason(e: dict[str, Any]) -> str:
    where = ", ".join(x for x in (e["errno"], e["hook"]) if x)
    text = str(e["reason_text"] or e["reason"])
    extra = "; ".join(FLOW_FLAGS.get(f, f) for f in e["flags"])
    if e.get("access_rule"):
        extra = "; ".join(x for x in (f"decided by {e['access_rule']}", extra) if x)
    return text + (f" ({where})" if where else "") + (f"; {extra}" if extra else "")


def render_flow(e: dict[str, Any]) -> str:
    """One flow event, one line (see FLOW_COLUMNS)."""
    at = datetime.datetime.fromtimestamp(e["time"], datetime.UTC)
    out = ""
    if e["lost_before"]:
        out += (f"... {plural(e['lost_before'], 'event')} lost here: this client read "
                "too slowly\n")
    backend = host_port(e["backend_address"], e["backend_port"]) if e["backend_address"] \
        else "-"
    return out + _flow_row([
        f"{at:%H:%M:%S}.{at.microsecond // 1000:03d}",
        enum_name(e["verdict"], VERDICT_PREFIX),
        e["service_port"] or "-",
        l4(e["destination"], e["port"], e["protocol"]),
        backend,
        flow_client(e),
        flow_reason(e),
    ])


def render_flows(events: Sequence[dict[str, Any]]) -> str:
    """The kept events (veer observe without --follow)."""
    if not events:
        return ("no flow events kept that match. Refusals, drops and denials are reported "
                "as they happen; translations only while someone follows with "
                "`veer observe --follow`.\n")
    return render_flow_header() + "".join(render_flow(e) for e in events)


def render_follow_start(translations: str) -> str:
    """The note `veer observe --follow` prints (on stderr) once the agent has
    registered it."""
    traced = ("translations are traced while you follow" if translations == "traced"
              else "translations are not traced for this filter")
    return (f"following flow events ({traced}; refusals, drops and denials are always "
            "reported); Ctrl-C to stop\n")
