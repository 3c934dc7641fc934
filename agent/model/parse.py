"""Kubernetes JSON/YAML (as plain dicts) -> the typed model.

Unknown fields are ignored, as an API client must. A malformed field raises
ModelError naming the object ("Service/default/web") and the field path
("spec.ports[1].port"), so a user can find the line to fix.

`parse_object` dispatches on apiVersion/kind and returns None for kinds veer
does not consume (a ConfigMap in a manifest directory is not an error).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from agent.errors import ModelError
from agent.model.objects import (
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    AccessAction,
    AccessPolicy,
    AccessRule,
    AffinityOverride,
    Algorithm,
    Endpoint,
    EndpointHints,
    EndpointPort,
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    Node,
    NodeAddress,
    ObjectMeta,
    Protocol,
    Redirect,
    RedirectMode,
    Service,
    ServicePort,
    ServiceType,
    SessionAffinity,
    SplitEntry,
    TrafficPolicy,
    TrafficPolicyKind,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRAFFIC_POLICY_GROUP = "veer.dev"

Model = Service | EndpointSlice | Node | TrafficPolicy
E = TypeVar("E")


class _Fields:
    """Typed access to one mapping inside an object, tracking its path for errors."""

    def __init__(self, obj: str, data: Any, path: str) -> None:
        self.obj = obj
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ModelError(obj, path or ".", f"expected an object, got {_kind(data)}")
        self.data: Mapping[str, Any] = data

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ModelError:
        return ModelError(self.obj, self._at(key), message)

    def sub(self, key: str) -> _Fields:
        return _Fields(self.obj, self.data.get(key), self._at(key))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def string(self, key: str, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        return value

    def integer(
        self, key: str, default: int = 0, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"{value} is outside {lo}..{hi}")
        return value

    def opt_boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.opt_boolean(key)
        return default if value is None else value

    def entries(self, key: str) -> list[tuple[str, Any]]:
        """The items of a list field with their paths; absent means empty."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        return [(f"{self._at(key)}[{i}]", item) for i, item in enumerate(value)]

    def objects(self, key: str) -> list[_Fields]:
        return [_Fields(self.obj, item, path) for path, item in self.entries(key)]

    def strings(self, key: str) -> tuple[str, ...]:
        out = []
        for path, item in self.entries(key):
            if not isinstance(item, str):
                raise ModelError(self.obj, path, f"expected a string, got {_kind(item)}")
            out.append(item)
        return tuple(out)

    def string_map(self, key: str) -> Mapping[str, str]:
        value = self.data.get(key)
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a map, got {_kind(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                raise self.error(f"{key}.{k}", f"expected a string, got {_kind(v)}")
            out[str(k)] = v
        return MappingProxyType(out)

    def enum(self, key: str, cls: Callable[[str], E], default: E) -> E:
        value = self.data.get(key)
        if value is None or value == "":
            return default
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(str(m) for m in cls.__members__.values())  # type: ignore[attr-defined]
            raise self.error(key, f"unsupported value {value!r} (allowed: {allowed})") from None

    def ip(self, path: str, value: Any) -> IPAddress:
        if not isinstance(value, str):
            raise ModelError(self.obj, path, f"expected an IP address, got {_kind(value)}")
        try:
            return served_ip(parse_ip(value))
        except ValueError:
            raise ModelError(self.obj, path, f"{value!r} is not an IP address") from None

    def ips(self, key: str) -> tuple[IPAddress, ...]:
        return tuple(self.ip(path, item) for path, item in self.entries(key))

    def cidrs(self, key: str) -> tuple[IPNetwork, ...]:
        out = []
        for path, item in self.entries(key):
            if not isinstance(item, str):
                raise ModelError(self.obj, path, f"expected a CIDR, got {_kind(item)}")
            try:
                out.append(parse_cidr(item.strip()))
            except ValueError:
                raise ModelError(self.obj, path, f"{item!r} is not a CIDR") from None
        return tuple(out)


def parse_ip(text: str) -> IPAddress:
    """`ipaddress.ip_address`, faster for IPv4 (an EndpointSlice carries one
    address per endpoint, and a relist parses them all).

    libc's inet_pton accepts exactly the dotted quads ipaddress does (four
    decimal octets, no leading zeros, no spaces); the address is then built
    from its packed bytes, which skips ipaddress's own string parsing.
    Anything else, IPv6 and every invalid string included, goes to
    ipaddress, so errors read the same.
    """
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        pass
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        legacy = _legacy_ipv4(text)
        if legacy is None:
            raise
        return legacy
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # A zone names a link of one host; Kubernetes refuses it (Go's
        # ParseIP does), and as a map key it would alias the zoneless address.
        raise ValueError(f"{text!r} carries a zone")
    return address


# An IPv4 address with leading zeros in an octet ("010.000.000.001"). The API
# server accepts it (with a warning) in fields it does not allocate itself,
# and kube-proxy reads it as decimal (ParseIPSloppy, net.ParseIP before Go
# 1.17); Python refuses it, as the octal it once meant elsewhere.
_LEGACY_IPV4 = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})\Z")


def _legacy_ipv4(text: str) -> ipaddress.IPv4Address | None:
    match = _LEGACY_IPV4.match(text)
    if match is None:
        return None
    octets = [int(group) for group in match.groups()]
    if any(octet > 255 for octet in octets):
        return None
    return ipaddress.IPv4Address(bytes(octets))


def served_ip(address: IPAddress) -> IPAddress:
    """The address an object's field names, as kube-proxy reads it: an
    IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address a.b.c.d.
    Go's net.IP holds both alike, and the API server accepts the mapped form
    in an externalIP, a LoadBalancer ingress IP or an IPv4 EndpointSlice."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_cidr(text: str) -> IPNetwork:
    """A CIDR, host bits masked, read as kube-proxy's ParseCIDRSloppy does
    (an IPv4 prefix may carry leading zeros); no zone."""
    address, slash, bits = text.partition("/")
    if not slash or not bits.isdigit():
        raise ValueError(f"{text!r} is not a CIDR")
    return ipaddress.ip_network(f"{parse_ip(address)}/{int(bits)}", strict=False)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def object_name(doc: Mapping[str, Any], namespaced: bool | None = None) -> str:
    """kind/namespace/name of a raw document, best effort, for error messages.

    Named the way `ObjectRef` names the parsed object: for a namespaced kind an
    absent namespace is "default"; a cluster-scoped kind has none. None: the
    kind is unknown, show what the document says.
    """
    kind = doc.get("kind") if isinstance(doc.get("kind"), str) else ""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    name = meta.get("name") if isinstance(meta.get("name"), str) else ""
    ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
    if namespaced is False:
        ns = ""
    elif namespaced and not ns:
        ns = "default"
    return "/".join(part for part in (kind or "object", ns, name or "?") if part)


def _meta(f: _Fields, namespaced: bool) -> ObjectMeta:
    m = f.sub("metadata")
    name = m.string("name")
    if not name:
        raise m.error("name", "is required")
    return ObjectMeta(
        name=name,
        namespace=(m.string("namespace") or "default") if namespaced else "",
        uid=m.string("uid"),
        resource_version=m.string("resourceVersion"),
        generation=m.integer("generation"),
        creation_timestamp=str(m.data.get("creationTimestamp") or ""),
        labels=m.string_map("labels"),
        annotations=m.string_map("annotations"),
    )


def _port(f: _Fields, key: str, required: bool = True) -> int:
    if required and not f.has(key):
        raise f.error(key, "is required")
    return f.integer(key, lo=1, hi=65535) if f.has(key) else 0


def parse_service(doc: Mapping[str, Any]) -> Service:
    obj = object_name(doc, namespaced=True)
    root = _Fields(obj, doc, "")
    meta = _meta(root, namespaced=True)
    spec = root.sub("spec")
    svc_type = spec.enum("type", ServiceType, ServiceType.CLUSTER_IP)

    raw_ips = list(spec.strings("clusterIPs"))
    if not raw_ips and spec.string("clusterIP"):
        raw_ips = [spec.string("clusterIP")]
    headless = raw_ips[:1] == ["None"]
    cluster_ips: tuple[IPAddress, ...] = ()
    if not headless and svc_type != ServiceType.EXTERNAL_NAME:
        # An empty clusterIPs list falls back to clusterIP: name that field in errors.
        field = "clusterIPs" if spec.strings("clusterIPs") else "clusterIP"
        cluster_ips = tuple(
            spec.ip(f"spec.{field}[{i}]" if field == "clusterIPs" else "spec.clusterIP", ip)
            for i, ip in enumerate(raw_ips)
        )
        if len({IPFamily.of(ip) for ip in cluster_ips}) != len(cluster_ips):
            raise spec.error("clusterIPs", "at most one address per IP family")

    ports = []
    for p in spec.objects("ports"):
        target: int | str
        raw_target = p.data.get("targetPort")
        if raw_target is None or raw_target == "" or (type(raw_target) is int and raw_target == 0):
            # The API server defaults an absent, 0 or "" targetPort to the port.
            target = _port(p, "port")
        elif isinstance(raw_target, bool):
            raise p.error("targetPort", "expected a port number or name")
        elif isinstance(raw_target, int):
            target = p.integer("targetPort", lo=1, hi=65535)
        elif isinstance(raw_target, str):
            numeric = raw_target.isascii() and raw_target.isdigit()
            target = int(raw_target) if numeric else raw_target
            if isinstance(target, int) and not 1 <= target <= 65535:
                raise p.error("targetPort", f"{target} is outside 1..65535")
        else:
            raise p.error("targetPort", "expected a port number or name")
        ports.append(
            ServicePort(
                name=p.string("name"),
                protocol=p.enum("protocol", Protocol, Protocol.TCP),
                port=_port(p, "port"),
                target_port=target,
                node_port=_port(p, "nodePort", required=False),
                app_protocol=p.string("appProtocol"),
            )
        )

    affinity = spec.enum("sessionAffinity", SessionAffinity, SessionAffinity.NONE)
    timeout = (
        spec.sub("sessionAffinityConfig")
        .sub("clientIP")
        .integer("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT_SECONDS, lo=1, hi=86400)
    )
    lb_ips = []
    for ing in root.sub("status").sub("loadBalancer").objects("ingress"):
        # ipMode Proxy: the load balancer must see the traffic (it speaks
        # the PROXY protocol or ends TLS), so in-cluster clients are not
        # short-circuited to the backends; kube-proxy leaves such an address
        # alone, as it does an empty one.
        if ing.has("ip") and ing.data["ip"] != "" and ing.data.get("ipMode") != "Proxy":
            lb_ips.append(ing.ip(f"{ing.path}.ip", ing.data["ip"]))

    return Service(
        meta=meta,
        type=svc_type,
        cluster_ips=cluster_ips,
        headless=headless,
        ip_families=tuple(_family(spec, path, value) for path, value in spec.entries("ipFamilies")),
        ip_family_policy=spec.string("ipFamilyPolicy", "SingleStack"),
        ports=tuple(ports),
        external_ips=spec.ips("externalIPs"),
        load_balancer_ips=tuple(lb_ips),
        load_balancer_source_ranges=spec.cidrs("loadBalancerSourceRanges"),
        external_traffic_policy=spec.enum(
            "externalTrafficPolicy", TrafficPolicyKind, TrafficPolicyKind.CLUSTER
        ),
        internal_traffic_policy=spec.enum(
            "internalTrafficPolicy", TrafficPolicyKind, TrafficPolicyKind.CLUSTER
        ),
        health_check_node_port=_port(spec, "healthCheckNodePort", required=False),
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        traffic_distribution=spec.string("trafficDistribution"),
        external_name=spec.string("externalName"),
        publish_not_ready_addresses=spec.boolean("publishNotReadyAddresses"),
    )


def _family(f: _Fields, path: str, value: Any) -> IPFamily:
    try:
        return IPFamily(value)
    except ValueError:
        raise ModelError(f.obj, path, f"unsupported IP family {value!r}") from None


_ADDRESS_VERSION = {"IPv4": 4, "IPv6": 6}


def _endpoints_checked(root: _Fields, address_type: str) -> list[Endpoint]:
    """A slice's endpoints, every field checked and named in any error."""
    endpoints = []
    for ep in root.objects("endpoints"):
        if address_type == "FQDN":
            addresses: tuple[IPAddress, ...] = ()
        else:
            addresses = ep.ips("addresses")
            want = _ADDRESS_VERSION[address_type]
            for i, a in enumerate(addresses):
                if a.version != want:
                    raise ep.error(f"addresses[{i}]", f"{a} is not an {address_type} address")
        cond = ep.sub("conditions")
        ready = cond.opt_boolean("ready")
        serving = cond.opt_boolean("serving")
        terminating = cond.boolean("terminating")
        # API contract: an unknown ready or serving state is true (kube-proxy
        # reads them so: Serving == nil || *Serving), terminating false.
        is_ready = True if ready is None else ready
        hints = None
        if ep.has("hints"):
            h = ep.sub("hints")
            hints = EndpointHints(
                for_zones=tuple(z.string("name") for z in h.objects("forZones")),
                for_nodes=tuple(n.string("name") for n in h.objects("forNodes")),
            )
        endpoints.append(
            Endpoint(
                addresses=addresses,
                ready=is_ready,
                serving=True if serving is None else serving,
                terminating=terminating,
                node_name=ep.string("nodeName"),
                zone=ep.string("zone"),
                hostname=ep.string("hostname"),
                hints=hints,
            )
        )
    return endpoints


def _absent_or(kind: type, a: Any, b: Any, c: Any) -> bool:
    """Whether each of three values is None or exactly a `kind` (three
    arguments, not a sequence: this runs for every endpoint)."""
    return ((a is None or type(a) is kind) and (b is None or type(b) is kind)
            and (c is None or type(c) is kind))


def _endpoints_fast(items: Any, address_type: str) -> list[Endpoint] | None:
    """A slice's endpoints, read straight from the dicts; None as soon as
    anything is not of the plain, valid shape (or carries hints, which are
    rare), and the slice is then read by `_endpoints_checked`, which names
    the field in its error.

    Why: a slice's endpoints are most of what the agent parses (a watch
    event per change, a whole list per relist), and the checked path builds
    a field path and a helper object for every value it reads. Invariant:
    where this returns a list, it equals what `_endpoints_checked` returns
    (tests/unit/test_parse.py compares the two on valid and broken slices).
    """
    if type(items) is not list:
        return None
    want = _ADDRESS_VERSION.get(address_type)  # None: FQDN, addresses unused
    out = []
    for ep in items:
        if type(ep) is not dict or ep.get("hints") is not None:
            return None
        addresses: tuple[IPAddress, ...] = ()
        raw = ep.get("addresses") if want else None
        if raw is not None:
            if type(raw) is not list:
                return None
            try:
                addresses = tuple([served_ip(parse_ip(a)) for a in raw])
            except (ValueError, TypeError):  # TypeError: not a string
                return None
            for a in addresses:
                if a.version != want:
                    return None
        cond = ep.get("conditions")
        if cond is None:
            cond = {}
        elif type(cond) is not dict:
            return None
        ready, serving, terminating = cond.get("ready"), cond.get("serving"), cond.get(
            "terminating")
        node_name, zone, hostname = ep.get("nodeName"), ep.get("zone"), ep.get("hostname")
        if not (_absent_or(bool, ready, serving, terminating)
                and _absent_or(str, node_name, zone, hostname)):
            return None
        # API contract: an unknown ready or serving state is true (kube-proxy
        # reads them so: Serving == nil || *Serving), terminating false.
        is_ready = True if ready is None else ready
        out.append(Endpoint(
            addresses=addresses,
            ready=is_ready,
            serving=True if serving is None else serving,
            terminating=bool(terminating),
            node_name=node_name or "",
            zone=zone or "",
            hostname=hostname or "",
        ))
    return out


def parse_endpoint_slice(doc: Mapping[str, Any]) -> EndpointSlice:
    obj = object_name(doc, namespaced=True)
    root = _Fields(obj, doc, "")
    meta = _meta(root, namespaced=True)
    address_type = root.string("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise root.error("addressType", f"expected IPv4, IPv6 or FQDN, got {address_type!r}")

    raw_endpoints = root.data.get("endpoints")
    endpoints = [] if raw_endpoints is None else _endpoints_fast(raw_endpoints, address_type)
    if endpoints is None:
        endpoints = _endpoints_checked(root, address_type)

    ports = []
    for p in root.objects("ports"):
        ports.append(
            EndpointPort(
                name=p.string("name"),
                port=p.integer("port", lo=1, hi=65535) if p.has("port") else None,
                protocol=p.enum("protocol", Protocol, Protocol.TCP),
                app_protocol=p.string("appProtocol"),
            )
        )
    return EndpointSlice(
        meta=meta,
        service_name=meta.labels.get(SERVICE_NAME_LABEL, ""),
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
    )


def parse_node(doc: Mapping[str, Any]) -> Node:
    obj = object_name(doc, namespaced=False)
    root = _Fields(obj, doc, "")
    meta = _meta(root, namespaced=False)
    addresses = tuple(
        NodeAddress(type=a.string("type"), address=a.string("address"))
        for a in root.sub("status").objects("addresses")
    )
    spec = root.sub("spec")
    pod_cidrs = spec.cidrs("podCIDRs")
    if not pod_cidrs and spec.has("podCIDR"):
        pod_cidrs = _Fields(obj, {"podCIDRs": [spec.string("podCIDR")]}, "spec").cidrs("podCIDRs")
    return Node(meta=meta, addresses=addresses, pod_cidrs=pod_cidrs)


# The limits of crds/trafficpolicies.veer.dev.yaml, checked here too so that a
# manifest directory refuses what the API server refuses, naming the same field.
# (Objects from the API server have passed them already.)
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_TARGET_REFS = 16
MAX_SPLIT_ENTRIES = 16
MAX_ACCESS_RULES = 32
MAX_RULE_SOURCES = 32


def _limit(f: _Fields, key: str, items: list[Any], most: int) -> None:
    if len(items) > most:
        raise f.error(key, f"must have at most {most} items, not {len(items)}")


def _service_name(f: _Fields, key: str) -> str:
    name = f.string(key)
    if not name:
        raise f.error(key, "is required")
    if len(name) > 63 or not _DNS_1035_LABEL.fullmatch(name):
        raise f.error(
            key,
            f"{name!r} is not a Service name (a DNS-1035 label: at most 63 characters, "
            "lowercase letters, digits and '-', starting with a letter)",
        )
    return name


def _unique(f: _Fields, key: str, names: list[str], what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise f.error(f"{key}[{i}]", f"duplicate {what} {name!r}")
        seen.add(name)


# The prefix length as netip.ParsePrefix reads it: decimal ASCII digits, no
# sign and no leading zero ("0" itself aside). `[0-9]`, not `\d`, which would
# take other scripts' digits.
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]*")


def parse_strict_cidr(text: str) -> IPNetwork:
    """A CIDR as the CRD's CEL `isCIDR()`/`cidr()` reads it (Go's
    netip.ParsePrefix, then Kubernetes' refusal of IPv4-mapped IPv6), so that
    a manifest directory refuses what the API server refuses. Python's
    ip_network is laxer in ways Go is not: it takes a netmask or hostmask
    after the slash ("/255.0.0.0"), a prefix length with leading zeros
    ("/08"), a zone ("fe80::%eth0/64") and an IPv4-mapped address
    ("::ffff:10.0.0.0/104"); each is refused here, with the reason. Host bits
    must be clear (the rule's `cidr(self) == cidr(self).masked()`).

    Not for loadBalancerSourceRanges and podCIDRs: those are read as
    sloppily as kube-proxy reads them (parse_cidr)."""
    address, slash, bits = text.rpartition("/")
    if not slash:
        raise ValueError("no prefix length")
    if not _PREFIX_BITS.fullmatch(bits):
        raise ValueError(f"prefix length {bits!r} is not a number of bits "
                         "(decimal, no leading zero; not a netmask)")
    if "%" in address:
        raise ValueError("an IPv6 zone is not allowed")
    # ip_address refuses leading zeros in IPv4 octets, as netip.ParseAddr does.
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise ValueError("an IPv4-mapped IPv6 address is not allowed; write the IPv4 CIDR")
    if int(bits) > ip.max_prefixlen:
        raise ValueError(f"prefix length {bits} is more than {ip.max_prefixlen}")
    return ipaddress.ip_network((ip, int(bits)), strict=True)


def _strict_cidrs(f: _Fields, key: str) -> tuple[IPNetwork, ...]:
    """CIDRs with a prefix length and no host bits, as the CRD's CEL rule
    `isCIDR(self) && cidr(self) == cidr(self).masked()` wants (parse_strict_cidr)."""
    out = []
    for path, item in f.entries(key):
        if not isinstance(item, str):
            raise ModelError(f.obj, path, f"expected a CIDR, got {_kind(item)}")
        try:
            out.append(parse_strict_cidr(item))
        except ValueError as err:
            raise ModelError(
                f.obj, path,
                f"{item!r} is not a CIDR such as 10.0.0.0/8 or fd00::/64 with no address "
                f"bits set beyond the prefix length ({err})",
            ) from None
    return tuple(out)


def parse_traffic_policy(doc: Mapping[str, Any]) -> TrafficPolicy:
    """Parse a TrafficPolicy, checking what crds/trafficpolicies.veer.dev.yaml
    checks (schema and CEL rules), with the same field paths; the operator
    checks the rest (that the Services exist, conflicts between policies)."""
    obj = object_name(doc, namespaced=True)
    root = _Fields(obj, doc, "")
    meta = _meta(root, namespaced=True)
    spec = root.sub("spec")
    refs = spec.objects("targetRefs")
    if not refs:
        raise spec.error("targetRefs", "at least one target Service is required")
    _limit(spec, "targetRefs", refs, MAX_TARGET_REFS)
    targets = []
    for t in refs:
        if t.string("kind", "Service") != "Service":
            raise t.error("kind", f"unsupported value {t.data['kind']!r} (allowed: Service)")
        targets.append(_service_name(t, "name"))
    _unique(spec, "targetRefs", targets, "target")

    lb = spec.sub("loadBalancing")
    affinity = None
    if lb.has("sessionAffinity"):
        sa = lb.sub("sessionAffinity")
        if not sa.has("type"):
            raise sa.error("type", "is required")
        kind = sa.enum("type", SessionAffinity, SessionAffinity.NONE)
        if kind != SessionAffinity.CLIENT_IP and sa.has("timeoutSeconds"):
            raise sa.error("timeoutSeconds", "may be set only when type is ClientIP")
        affinity = AffinityOverride(
            type=kind,
            timeout_seconds=sa.integer(
                "timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT_SECONDS, lo=1, hi=86400
            ),
        )

    entries = spec.objects("split")
    _limit(spec, "split", entries, MAX_SPLIT_ENTRIES)
    split = []
    for s in entries:
        if not s.has("weight"):
            raise s.error("weight", "is required")
        split.append(
            SplitEntry(
                service=_service_name(s, "service"), weight=s.integer("weight", lo=0, hi=1000)
            )
        )
    _unique(spec, "split", [s.service for s in split], "service")
    if split and not any(s.weight > 0 for s in split):
        raise spec.error("split", "at least one split weight must be greater than 0")

    access = None
    if spec.has("access"):
        a = spec.sub("access")
        rules = a.objects("rules")
        _limit(a, "rules", rules, MAX_ACCESS_RULES)
        parsed_rules = []
        for r in rules:
            if not r.has("action"):
                raise r.error("action", "is required")
            sources = _strict_cidrs(r, "sources")
            if not sources:
                raise r.error("sources", "at least one CIDR is required")
            _limit(r, "sources", list(sources), MAX_RULE_SOURCES)
            parsed_rules.append(
                AccessRule(
                    action=r.enum("action", AccessAction, AccessAction.ALLOW), sources=sources
                )
            )
        access = AccessPolicy(
            default_action=a.enum("defaultAction", AccessAction, AccessAction.ALLOW),
            rules=tuple(parsed_rules),
        )

    redirect = None
    if spec.has("redirect"):
        r = spec.sub("redirect")
        redirect = Redirect(
            port=_port(r, "port"), mode=r.enum("mode", RedirectMode, RedirectMode.AUTO)
        )

    return TrafficPolicy(
        meta=meta,
        target_refs=tuple(targets),
        algorithm=lb.enum("algorithm", Algorithm, Algorithm.RANDOM),
        session_affinity=affinity,
        split=tuple(split),
        access=access,
        redirect=redirect,
        sockmap=spec.sub("acceleration").boolean("sockmap"),
    )


_PARSERS: dict[tuple[str, str], Callable[[Mapping[str, Any]], Model]] = {
    ("", "Service"): parse_service,
    ("discovery.k8s.io", "EndpointSlice"): parse_endpoint_slice,
    ("", "Node"): parse_node,
    (TRAFFIC_POLICY_GROUP, "TrafficPolicy"): parse_traffic_policy,
}


def parse_object(doc: Any) -> Model | None:
    """Parse one Kubernetes object; None if veer does not consume its kind."""
    if not isinstance(doc, Mapping):
        raise ModelError("object", ".", f"expected an object, got {_kind(doc)}")
    api_version = doc.get("apiVersion")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ModelError(object_name(doc), "kind", "is required")
    if not isinstance(api_version, str) or not api_version:
        raise ModelError(object_name(doc), "apiVersion", "is required")
    group = api_version.rpartition("/")[0]
    parser = _PARSERS.get((group, kind))
    return parser(doc) if parser else None
