"""Who this node is, as its Node object says: compute's view of "here"."""

from __future__ import annotations

import ipaddress

from agent.compute.types import NodeIdentity
from agent.model.objects import IPAddress, Node
from agent.model.snapshot import ClusterSnapshot


def node_addresses(node: Node) -> tuple[IPAddress, ...]:
    """A Node's InternalIP and ExternalIP addresses, in the Node's order;
    entries that are not IP addresses (or repeat) are skipped."""
    out: list[IPAddress] = []
    for entry in node.addresses:
        if entry.type not in ("InternalIP", "ExternalIP"):
            continue
        try:
            address = ipaddress.ip_address(entry.address)
        except ValueError:
            continue
        if address not in out:
            out.append(address)
    return tuple(out)


def identity_of(snapshot: ClusterSnapshot, name: str) -> NodeIdentity:
    """This node's identity; a node without a Node object yet has only a name."""
    node = snapshot.nodes.get(name)
    if node is None:
        return NodeIdentity(name)
    return NodeIdentity(name, node.zone, node_addresses(node))
