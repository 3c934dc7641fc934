/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of veer's socket-level load balancer, one comment each.
 *
 * All maps but the last two (the live agent's event ring buffer and its
 * runtime switches) are pinned under VEER_PIN_DIR (a bpffs directory chosen
 * by the agent's --bpffs option and passed in as a -D flag). BCC reuses a pinned
 * map when one exists, which is how a restarted agent adopts the state its
 * predecessor left: the kernel kept forwarding with it in the meantime.
 *
 * Sizes are defaults chosen for 10,000+ Services with a few backends each;
 * the agent reports fill levels so pressure is visible before it bites.
 */
#ifndef VEER_MAPS_H
#define VEER_MAPS_H

#include "veer_structs.h"

#ifndef VEER_PIN_DIR
#error "VEER_PIN_DIR must name the bpffs directory to pin maps in"
#endif

#ifndef VEER_SERVICES_MAX
#define VEER_SERVICES_MAX 262144
#endif
#ifndef VEER_BACKENDS_MAX
#define VEER_BACKENDS_MAX 131072
#endif
#ifndef VEER_VIPS_MAX
#define VEER_VIPS_MAX 65536
#endif
#ifndef VEER_AFFINITY_MAX
#define VEER_AFFINITY_MAX 65536
#endif
#ifndef VEER_NAT_MAX
#define VEER_NAT_MAX 262144
#endif
#ifndef VEER_REVNAT_MAX
#define VEER_REVNAT_MAX 262144
#endif

/* Frontends and their backend slots: see struct veer_service_key. */
BPF_TABLE_PINNED("hash", struct veer_service_key, struct veer_service_value,
		 veer_services, VEER_SERVICES_MAX, VEER_PIN_DIR "/veer_services");

/* Backend id -> address. */
BPF_TABLE_PINNED("hash", struct veer_backend_key, struct veer_backend_value,
		 veer_backends, VEER_BACKENDS_MAX, VEER_PIN_DIR "/veer_backends");

/* Addresses that carry frontends, to refuse unknown ports. */
BPF_TABLE_PINNED("hash", struct veer_vip_key, struct veer_vip_value,
		 veer_vips, VEER_VIPS_MAX, VEER_PIN_DIR "/veer_vips");

/* The addresses the per-packet path looks further for, with their
 * VEER_TC_ADDR_* flags: those of external-scope frontends (node addresses
 * for NodePorts, externalIPs, load-balancer IPs), their backends, and the
 * SNAT addresses (veer_node). Any other packet passes veer_tc_ingress and
 * veer_tc_egress after this one lookup. The agent sets a flag before
 * anything can need it (a frontend, a backend slot, veer_node) and clears it
 * only once nothing does, NAT entries included (veer_nat_fwd's destination,
 * veer_nat_rev's source and destination), so a flow never outlives it. */
BPF_TABLE_PINNED("hash", struct veer_vip_key, struct veer_vip_value,
		 veer_tc_addrs, VEER_VIPS_MAX, VEER_PIN_DIR "/veer_tc_addrs");

/* Service CIDRs, to refuse addresses that carry no Service. */
BPF_TABLE_PINNED("lpm_trie", struct veer_cidr_key, struct veer_cidr_value,
		 veer_service_cidrs, 64, VEER_PIN_DIR "/veer_service_cidrs",
		 BPF_F_NO_PREALLOC);

/* Socket cookie + backend -> Service address, for getpeername/recvmsg of
 * sockets other than connected TCP ones (those are in veer_sock_peers).
 * LRU: entries of closed sockets age out without the agent's help. */
BPF_TABLE_PINNED("lru_hash", struct veer_sock_revnat_key,
		 struct veer_sock_revnat_value, veer_sock_revnat,
		 VEER_REVNAT_MAX, VEER_PIN_DIR "/veer_sock_revnat");

/* Connected TCP sockets' peers, by socket cookie (see struct veer_sock_peer).
 * A power of two: the slot is the cookie's low bits. */
#ifndef VEER_SOCK_PEERS_MAX
#define VEER_SOCK_PEERS_MAX VEER_REVNAT_MAX
#endif
_Static_assert((VEER_SOCK_PEERS_MAX & (VEER_SOCK_PEERS_MAX - 1)) == 0,
	       "VEER_SOCK_PEERS_MAX must be a power of two");
BPF_TABLE_PINNED("array", __u32, struct veer_sock_peer, veer_sock_peers,
		 VEER_SOCK_PEERS_MAX, VEER_PIN_DIR "/veer_sock_peers");

/* Client (netns cookie) + service id -> backend, for ClientIP affinity.
 * LRU: idle clients age out; the timeout itself is checked by the program. */
BPF_TABLE_PINNED("lru_hash", struct veer_affinity_key, struct veer_affinity_value,
		 veer_affinity, VEER_AFFINITY_MAX, VEER_PIN_DIR "/veer_affinity");

/* Current (backend, service) pairs of frontends with affinity. */
BPF_TABLE_PINNED("hash", struct veer_affinity_match_key,
		 struct veer_affinity_match_value, veer_affinity_match,
		 VEER_BACKENDS_MAX, VEER_PIN_DIR "/veer_affinity_match");

/* Per-packet NAT, forward: original tuple (client -> frontend) -> rewritten
 * tuple (client or node -> backend). LRU: idle flows age out. */
BPF_TABLE_PINNED("lru_hash", struct veer_tuple, struct veer_nat_value, veer_nat_fwd,
		 VEER_NAT_MAX, VEER_PIN_DIR "/veer_nat_fwd");

/* Per-packet NAT, reverse: reply tuple (backend -> client or node) ->
 * restored tuple (frontend -> client). */
BPF_TABLE_PINNED("lru_hash", struct veer_tuple, struct veer_nat_value, veer_nat_rev,
		 VEER_NAT_MAX, VEER_PIN_DIR "/veer_nat_rev");

/* loadBalancerSourceRanges of frontends with VEER_SVC_F_SOURCE_RANGES. */
BPF_TABLE_PINNED("lpm_trie", struct veer_source_key, struct veer_cidr_value, veer_lb_sources,
		 16384, VEER_PIN_DIR "/veer_lb_sources", BPF_F_NO_PREALLOC);

/* Client address + service id -> backend, ClientIP affinity from outside. */
BPF_TABLE_PINNED("lru_hash", struct veer_ext_affinity_key, struct veer_affinity_value,
		 veer_ext_affinity, VEER_AFFINITY_MAX, VEER_PIN_DIR "/veer_ext_affinity");

/* The cluster's pod CIDRs (--cluster-cidr): a pod on another node reaching an
 * externalTrafficPolicy: Local frontend is served cluster-wide, like
 * kube-proxy's short-circuit for traffic "from a pod". */
BPF_TABLE_PINNED("lpm_trie", struct veer_cidr_key, struct veer_cidr_value,
		 veer_cluster_cidrs, 64, VEER_PIN_DIR "/veer_cluster_cidrs", BPF_F_NO_PREALLOC);

/* Access rules of frontends with VEER_SVC_F_ACCESS (see veer_access_value). */
BPF_TABLE_PINNED("lpm_trie", struct veer_source_key, struct veer_access_value, veer_access,
		 16384, VEER_PIN_DIR "/veer_access", BPF_F_NO_PREALLOC);

/* Hits per access rule, per CPU. */
BPF_TABLE_PINNED("percpu_hash", struct veer_rule_key, __u64, veer_access_hits,
		 16384, VEER_PIN_DIR "/veer_access_hits");

/* Client network namespace (cookie) -> its addresses (addr4/addr6 as in
 * veer_node_value), written by the agent, which watches the namespaces of
 * the processes in its cgroup: a socket hook runs before the source address
 * is chosen, and this is how access rules learn who is calling. */
BPF_TABLE_PINNED("hash", __u64, struct veer_node_value, veer_netns_addrs,
		 16384, VEER_PIN_DIR "/veer_netns_addrs");

/* RoundRobin cursors, indexed by service id. */
BPF_TABLE_PINNED("array", __u32, __u32, veer_rr_cursor, VEER_SERVICES_MAX + 1,
		 VEER_PIN_DIR "/veer_rr_cursor");

/* LeastConnections: connections opened per backend id and not given back
 * (sockets of this node and per-packet flows it translates), and the backend
 * each counted socket holds (released by veer_sock_release). */
BPF_TABLE_PINNED("array", __u32, struct veer_conns_value, veer_backend_conns,
		 VEER_BACKENDS_MAX + 1, VEER_PIN_DIR "/veer_backend_conns");
BPF_TABLE_PINNED("hash", __u64, struct veer_lc_sock_value, veer_lc_socks,
		 VEER_REVNAT_MAX, VEER_PIN_DIR "/veer_lc_socks");
/* Per-packet flows counted the same way, keyed by the client's tuple as it
 * arrives (the forward NAT key). A plain hash, not an LRU: an entry evicted
 * silently would be a count never given back; when it is full a new flow is
 * simply not counted. */
BPF_TABLE_PINNED("hash", struct veer_tuple, struct veer_lc_sock_value, veer_lc_flows,
		 VEER_REVNAT_MAX, VEER_PIN_DIR "/veer_lc_flows");
BPF_TABLE_PINNED("array", __u32, struct veer_conns_swept_value, veer_backend_conns_swept,
		 VEER_BACKENDS_MAX + 1, VEER_PIN_DIR "/veer_backend_conns_swept");

/* Redirect: frontend service id -> the node-local proxy (a backend value),
 * the proxy's uid, and the original destinations: by socket cookie from
 * connect() until sockops sees the client's port, then by client end. */
BPF_TABLE_PINNED("hash", __u32, struct veer_backend_value, veer_redirects,
		 16384, VEER_PIN_DIR "/veer_redirects");
BPF_TABLE_PINNED("array", __u32, struct veer_proxy_value, veer_proxy, 1,
		 VEER_PIN_DIR "/veer_proxy");
BPF_TABLE_PINNED("lru_hash", __u64, struct veer_orig_value, veer_redirect_socks,
		 VEER_REVNAT_MAX, VEER_PIN_DIR "/veer_redirect_socks");
BPF_TABLE_PINNED("lru_hash", struct veer_orig_key, struct veer_orig_value, veer_orig_dst,
		 VEER_REVNAT_MAX, VEER_PIN_DIR "/veer_orig_dst");

/* This node's addresses (one entry, key 0), written by the agent. */
BPF_TABLE_PINNED("array", __u32, struct veer_node_value, veer_node, 1,
		 VEER_PIN_DIR "/veer_node");

/* Per-CPU event counters indexed by enum veer_counter. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, veer_counters, VEER_CNT_MAX,
		 VEER_PIN_DIR "/veer_counters");

#ifndef VEER_EVENTS_PAGES
#define VEER_EVENTS_PAGES 256 /* 1 MiB: about 8,000 events of 120 bytes */
#endif

/* Flow events (struct veer_event) for the live agent. Not pinned: only the
 * agent process that loaded the programs reads it; programs left attached
 * after the agent stops keep writing into it until a new agent replaces them,
 * and what does not fit is counted (VEER_CNT_EVENTS_LOST). */
BPF_RINGBUF_OUTPUT(veer_events, VEER_EVENTS_PAGES);

/* Runtime switches (struct veer_config, key 0), written by the live agent.
 * Not pinned: a new agent starts with every switch off. */
BPF_ARRAY(veer_config, struct veer_config, 1);

#endif /* VEER_MAPS_H */
