/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every key and value struct shared between veer's BPF programs and the
 * agent, defined once.
 *
 * The agent mirrors each struct in agent/datapath/ebpf/structs.py; the test
 * tests/unit/test_struct_layout.py compiles this header and compares every
 * size and field offset with the mirror. Change both or neither.
 *
 * Conventions:
 *  - Addresses are 16 bytes in network order. An IPv4 address fills the
 *    first 4 bytes and the other 12 are zero; `family` says which it is.
 *  - Ports are in network order (`__be16`), exactly as the kernel hands
 *    them to the socket hooks, so the fast path never swaps bytes.
 *  - Padding is explicit and always zero, because hash maps compare keys
 *    byte for byte.
 */
#ifndef VEER_STRUCTS_H
#define VEER_STRUCTS_H

#define VEER_FAMILY_IPV4 4
#define VEER_FAMILY_IPV6 6

/* A frontend slot in the services map.
 *
 * One Service port on one address is one frontend. It occupies count + 1
 * entries that share addr/port/proto/family: slot 0 is the frontend entry
 * (its value holds the backend count), slots 1..count each name one backend.
 * The agent writes backend slots before raising the count and lowers the
 * count before deleting slots, so a reader that sees count N always finds
 * slots 1..N filled. */
struct veer_service_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family; /* VEER_FAMILY_* */
	__u16 slot;  /* 0: the frontend entry; 1..count: backend slots */
	__u8 scope;  /* VEER_SCOPE_*: which traffic this entry serves */
	__u8 pad;
};

/* A frontend has one set of entries per scope. Connections that start on
 * this node (socket hooks) use VEER_SCOPE_SOCKET; packets arriving from
 * outside (TC) use VEER_SCOPE_EXTERNAL, which honours
 * externalTrafficPolicy and exists only for NodePort/ExternalIP/LB. */
#define VEER_SCOPE_SOCKET 0
#define VEER_SCOPE_EXTERNAL 1

/* Frontend flags (slot 0 only). */
#define VEER_SVC_F_NONE 0
/* sessionAffinity: ClientIP — a client keeps its backend for
 * affinity_timeout seconds after its last connection. */
#define VEER_SVC_F_AFFINITY (1 << 0)
/* With no backend, fail with EHOSTUNREACH (kube-proxy drops: endpoints exist
 * elsewhere but a Local policy keeps this traffic on this node) instead of
 * ECONNREFUSED (kube-proxy rejects: no endpoint anywhere). */
#define VEER_SVC_F_DROP_EMPTY (1 << 1)
/* externalTrafficPolicy: Local (external scope): never SNAT, keep the
 * client's address. */
#define VEER_SVC_F_EXT_LOCAL (1 << 2)
/* loadBalancerSourceRanges (external scope): only clients inside the
 * frontend's ranges in veer_lb_sources may start a flow. */
#define VEER_SVC_F_SOURCE_RANGES (1 << 3)
/* The slots form a lookup table (a TrafficPolicy's weights or Maglev): a
 * backend may fill several slots and positions matter. */
#define VEER_SVC_F_TABLE (1 << 4)
/* A TrafficPolicy's access rules (veer_access) decide who may connect. */
#define VEER_SVC_F_ACCESS (1 << 5)
/* ... and a client no rule matches is denied (defaultAction: Deny). */
#define VEER_SVC_F_ACCESS_DENY (1 << 6)
/* A TrafficPolicy's redirect (socket scope, TCP): connections go to the
 * node-local proxy in veer_redirects instead, except the proxy's own (see
 * struct veer_proxy_value). */
#define VEER_SVC_F_REDIRECT (1 << 7)
/* sockmap acceleration (socket scope, TCP): once both ends of a connection
 * are on this node, their data is spliced socket to socket (bpf/sockmap.c).
 * Set only where the agent's start-up probe passed. */
#define VEER_SVC_F_SOCKMAP (1 << 10)
/* A TrafficPolicy's redirect in TPROXY mode (socket scope, TCP): leave
 * connect() alone, except the proxy's own; the node's nftables hand the
 * packets to the proxy's transparent socket (agent/datapath/ebpf/tproxy_redirect.py). */
#define VEER_SVC_F_PASS (1 << 11)

/* The load-balancing algorithm (bits 8-9 of the flags, slot 0):
 *   RANDOM  a random slot;
 *   ROUND_ROBIN  the frontend's cursor in veer_rr_cursor, advanced atomically;
 *   MAGLEV  the slot the flow's hash names (veer_flow_hash), in a Maglev table;
 *   LEAST_CONN  the backend with the fewest open connections from this node
 *           (veer_backend_conns) relative to its weight, which backend slots
 *           hold in `count`. */
#define VEER_SVC_ALG_SHIFT 8
#define VEER_SVC_ALG_MASK (3 << VEER_SVC_ALG_SHIFT)
#define VEER_ALG_RANDOM 0
#define VEER_ALG_ROUND_ROBIN 1
#define VEER_ALG_MAGLEV 2
#define VEER_ALG_LEAST_CONN 3

struct veer_service_value {
	__u32 backend_id;       /* slot > 0: the backend in this slot; 0 in slot 0 */
	__u16 count;            /* slot 0: number of backend slots in use;
				 * slot > 0 of a LEAST_CONN frontend: the backend's weight */
	__u16 flags;            /* slot 0: VEER_SVC_F_* */
	__u32 service_id;       /* stable id of the frontend, kept across restarts */
	__u32 affinity_timeout; /* slot 0: seconds, with VEER_SVC_F_AFFINITY */
};

/* Backends are referenced by id so that a backend shared by many frontends
 * is written once, and so that ids stay stable across agent restarts (they
 * are rebuilt from this map). Id 0 is never allocated. */
struct veer_backend_key {
	__u32 backend_id;
};

struct veer_backend_value {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 family;
	__u32 flags; /* reserved, zero */
};

/* Every address that carries at least one frontend. A connection to such an
 * address on a port/protocol with no frontend is refused, as kube-proxy
 * rejects unknown ports on a ClusterIP. */
struct veer_vip_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};

struct veer_vip_value {
	__u32 flags; /* veer_vips: reserved, zero; veer_tc_addrs: VEER_TC_ADDR_* */
};

/* What the per-packet path may find for an address of veer_tc_addrs. */
#define VEER_TC_ADDR_FRONTEND 1 /* carries an external frontend: flows start there */
#define VEER_TC_ADDR_BACKEND 2  /* serves one: its replies may need restoring */
#define VEER_TC_ADDR_SNAT 4     /* a source-NAT address (veer_node): replies of
				 * flows veer source-NATed arrive addressed to it */

/* The Service CIDRs (an LPM trie). A connection to an address inside them
 * that carries no frontend is refused: the Service was deleted or never
 * existed, and failing fast beats a routing timeout. */
struct veer_cidr_key {
	__u32 prefixlen; /* LPM tries require the prefix length first */
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct veer_cidr_value {
	__u32 flags; /* reserved, zero */
};

/* Per-socket reverse translation, written by connect/sendmsg and read by
 * getpeername/recvmsg: "on socket `cookie`, the peer `addr:port` stands for
 * the Service address in the value". Keyed by cookie so that two sockets
 * talking to one backend through different Services each see their own. */
struct veer_sock_revnat_key {
	__u64 cookie;
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct veer_sock_revnat_value {
	__u8 addr[16];
	__be16 port;
	__u16 pad;
	__u32 service_id;
};

/* A connected TCP socket's peer and the Service address it stands for, in
 * veer_sock_peers: an array indexed by the low bits of the socket cookie,
 * each slot naming the socket it holds. A TCP socket has one peer for life,
 * so connect() writes its slot in place, without the hash map update (a
 * lock, an element taken from a free list, or an LRU eviction) that costs
 * more than the rest of the translation; UDP sockets, which may send to
 * many Services, stay in veer_sock_revnat. A slot is taken over by a later
 * socket whose cookie shares its low bits, as an LRU would evict it.
 *
 * A slot is veer_sock_revnat's key and value side by side. `key.cookie` is
 * 0 while the slot is empty and VEER_SOCK_PEER_BUSY while a connect()
 * writes it: a writer takes the slot by swapping that in (cmpxchg) and
 * releases it by swapping its cookie in (xchg), and a reader trusts what it
 * copied only if the cookie was its own before and after. */
struct veer_sock_peer {
	struct veer_sock_revnat_key key;
	struct veer_sock_revnat_value svc;
};

#define VEER_SOCK_PEER_BUSY (~0ULL)

/* Session affinity at the socket layer. The client is identified by its
 * network namespace cookie: connect() runs before the source address is
 * chosen, and a pod is one namespace, so this is ClientIP affinity for pods
 * (host processes, sharing the host namespace, share one entry). */
struct veer_affinity_key {
	__u64 client; /* netns cookie */
	__u32 service_id;
	__u32 pad;
};

struct veer_affinity_value {
	__u32 backend_id;
	__u32 pad;
	__u64 last_used_ns; /* bpf_ktime_get_ns() of the last connection */
};

/* (backend, service, scope) triples that are current: an affinity entry is
 * honoured only while its backend still serves that frontend, in the scope
 * that reads the entry (the socket scope may serve every endpoint while the
 * external one, under externalTrafficPolicy Local, serves this node's). */
struct veer_affinity_match_key {
	__u32 backend_id;
	__u32 service_id;
	__u32 scope; /* VEER_SCOPE_* */
};

struct veer_affinity_match_value {
	__u32 flags; /* reserved, zero */
};

/* A frontend's allowed client ranges (an LPM trie keyed by service id
 * first, so one trie serves every frontend). */
struct veer_source_key {
	__u32 prefixlen; /* 32 (service id) + 32 (family, pad) + the range's bits */
	__u32 service_id;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

/* A frontend's access rules (an LPM trie keyed like veer_lb_sources). The
 * agent compiles the first-match rule list into one entry per source range:
 * the value is the first rule whose ranges contain the whole range, which is
 * then the first rule matching any address the range is the longest match
 * for (ranges containing one address are nested). No match: the default. */
struct veer_access_value {
	__u32 rule;   /* the rule's position in the policy */
	__u32 action; /* VEER_ACCESS_ALLOW or VEER_ACCESS_DENY */
};

#define VEER_ACCESS_ALLOW 0
#define VEER_ACCESS_DENY 1
#define VEER_RULE_DEFAULT 0xffff /* veer_event.rule / veer_rule_key.rule: the default */

/* Per-rule hit counters (per CPU): rule VEER_RULE_DEFAULT counts the default. */
struct veer_rule_key {
	__u32 service_id;
	__u32 rule;
};

/* Open connections from this node per backend (LeastConnections): an array
 * indexed by backend id, changed with atomic adds only. */
struct veer_conns_value {
	__u32 open;
	__u32 pad;
};

/* Connections counted in veer_backend_conns that the agent found ended
 * without the kernel seeing their end (a per-packet flow whose NAT entry
 * expired before any FIN or RST passed): an array indexed by backend id,
 * written only by the agent, so a backend's open count is open - swept. A
 * userspace write cannot be atomic with the kernel's adds to `open`, which is
 * why the agent never writes veer_backend_conns itself. */
struct veer_conns_swept_value {
	__u32 swept;
	__u32 pad;
};

/* The backend a LeastConnections socket counts against, by socket cookie,
 * so that its release gives the connection back.
 * Also by flow tuple for per-packet flows (veer_lc_flows), given back when a
 * FIN or RST passes or by the agent's sweep. */
struct veer_lc_sock_value {
	__u32 backend_id;
	__u32 pad;
};

/* Who the node-local proxy is (an array of one, key 0): connections made by
 * processes running as `uid` are never redirected, so the proxy can reach the
 * Service it stands in front of without looping back to itself. */
struct veer_proxy_value {
	__u32 uid;
	__u32 set; /* 0: no proxy uid configured (no frontend is redirected) */
};

/* The original destination of a redirected connection, keyed by the
 * client's end (its address and port as the proxy sees them), for the
 * proxy's getsockopt(SO_ORIGINAL_DST). Also the value of the per-socket map
 * that carries it from connect() to the moment the port is known. */
struct veer_orig_key {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct veer_orig_value {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

/* One end of a TCP connection, as sockops and sk_msg see it (sockmap
 * acceleration): `local` is the socket's own address. The peer's key is the
 * same with local and remote swapped. IPv4-mapped addresses are IPv4. */
struct veer_sock_key {
	__u8 local[16];
	__u8 remote[16];
	__be16 lport;
	__be16 rport;
	__u8 family;
	__u8 pad[3];
};

/* ClientIP affinity on the per-packet path, keyed by the client's address
 * (the socket path keys by network namespace instead). */
struct veer_ext_affinity_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
	__u32 service_id;
};

/* A connection's addresses as one packet carries them (per-packet path).
 * Used as the key of both NAT maps: a packet whose tuple is a key is
 * rewritten to the tuple in the value. */
struct veer_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct veer_nat_value {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 service_id;   /* 0 in entries a DSR flow's backend node made, and in
			     * the pair of a node's own connection moved off a
			     * source-NATed flow's port (veer_host_flow) */
	__u64 last_seen_ns; /* bpf_ktime_get_ns(); the top three bits are flags (tc_nat.c) */
};

/* This node's own addresses (key 0), for SNAT. */
struct veer_node_value {
	__u8 addr4[16]; /* IPv4 in the first 4 bytes; all zero: none */
	__u8 addr6[16];
};

/* Indexes of the per-CPU counters map (key __u32, value __u64). The agent
 * names them in agent/datapath/ebpf/structs.py (COUNTER_NAMES). */
enum veer_counter {
	VEER_CNT_TRANSLATED = 0,      /* a connect/sendmsg rewritten to a backend */
	VEER_CNT_REFUSED_NO_BACKEND,  /* frontend with no backend */
	VEER_CNT_REFUSED_UNKNOWN_PORT,/* Service address, port not exposed */
	VEER_CNT_REFUSED_NO_SERVICE,  /* inside a Service CIDR, no Service */
	VEER_CNT_INCONSISTENT,        /* a slot or backend missing: should never count */
	VEER_CNT_REVNAT,              /* getpeername/recvmsg answered with a Service address */
	VEER_CNT_DROPPED_NO_LOCAL,    /* frontend empty under a Local policy: EHOSTUNREACH */
	VEER_CNT_AFFINITY_HIT,        /* backend taken from a live affinity entry */
	VEER_CNT_NAT_NEW,             /* TC: a new external flow translated */
	VEER_CNT_NAT_SNAT,            /* TC: ... and source-NATed to the node */
	VEER_CNT_NAT_DROP,            /* TC: external packet to an empty frontend dropped */
	VEER_CNT_NAT_REPLY,           /* TC: a reply translated back */
	VEER_CNT_NAT_FAIL,            /* TC: no route, no SNAT port, or a write failed */
	VEER_CNT_NAT_DENIED_SOURCE,   /* TC: client outside loadBalancerSourceRanges */
	VEER_CNT_NAT_SHORT_CIRCUIT,   /* TC: pod client of a Local frontend: cluster-wide */
	VEER_CNT_EVENTS_SENT,         /* flow events written to veer_events */
	VEER_CNT_EVENTS_LOST,         /* flow events lost: veer_events was full */
	VEER_CNT_NAT_REJECT,          /* TC: no endpoint anywhere: ICMP port unreachable sent */
	VEER_CNT_ACCESS_DENIED,       /* a TrafficPolicy access rule refused a connect/sendmsg */
	VEER_CNT_NAT_ACCESS_DENIED,   /* TC: a TrafficPolicy access rule dropped a new flow */
	VEER_CNT_ACCESS_UNKNOWN,      /* access rules, but the client's netns has no known address */
	VEER_CNT_REDIRECTED,          /* a connect() sent to the node-local proxy (TrafficPolicy redirect) */
	VEER_CNT_ORIG_DST,            /* a proxy's SO_ORIGINAL_DST answered */
	VEER_CNT_ACCEL_SOCKETS,       /* sockmap: a socket joined the splice map */
	VEER_CNT_ACCEL_SPLICED,       /* sockmap: a direction of a connection is spliced */
	VEER_CNT_ACCEL_TCP,           /* sockmap: a direction stays on TCP (peer not local yet) */
	VEER_CNT_NAT_DSR,             /* TC: a new external flow sent to its backend's node by DSR */
	VEER_CNT_NAT_DSR_IN,          /* TC: a DSR flow arrived for a local backend: replies to restore */
	VEER_CNT_NAT_HOST_MOVED,      /* TC: the node's own connection moved off a port a SNAT flow holds */
	VEER_CNT_MAX,
};

/* ---- Flow events --------------------------------------------------------
 *
 * One record per verdict, written to the veer_events ring buffer and read by
 * the live agent (agent/datapath/ebpf/events.py). Refusals, drops, denials
 * and inconsistencies are always reported: they are rare and they are what
 * the person on call needs. Translations (connect/sendmsg rewritten, a new
 * per-packet flow) are reported only while veer_config.trace_translations is
 * set, which the agent does while some client observes them.
 */

/* Where the verdict was taken (veer_event.hook). */
#define VEER_HOOK_CONNECT4 1
#define VEER_HOOK_CONNECT6 2
#define VEER_HOOK_SENDMSG4 3
#define VEER_HOOK_SENDMSG6 4
#define VEER_HOOK_TC_INGRESS 5

/* veer_event.flags */
#define VEER_EV_F_AFFINITY (1 << 0)      /* backend taken from a live affinity entry */
#define VEER_EV_F_SNAT (1 << 1)          /* TC: source-NATed to the node */
#define VEER_EV_F_SHORT_CIRCUIT (1 << 2) /* TC: pod client of a Local frontend */
#define VEER_EV_F_MAPPED (1 << 3)        /* an IPv4-mapped address on an IPv6 socket */
#define VEER_EV_F_REDIRECT (1 << 4)      /* sent to the node-local proxy (redirect) */
#define VEER_EV_F_DSR (1 << 5)           /* TC: sent on by DSR (--nodeport-mode dsr) */

struct veer_event {
	__u64 time_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;     /* socket hooks: the socket's cookie; TC: 0 */
	__u64 netns;      /* socket hooks: the caller's network namespace cookie; TC: 0 */
	__u8 saddr[16];   /* TC: the client; socket hooks: the client netns's address
			   * when access rules looked it up, else zero */
	__u8 daddr[16];   /* the address dialled: the Service (or node) address */
	__u8 baddr[16];   /* the backend, when one was chosen */
	__be16 sport;     /* TC only */
	__be16 dport;
	__be16 bport;
	__u8 proto;
	__u8 family;      /* VEER_FAMILY_*, of daddr (and saddr, baddr) */
	__u32 service_id; /* the frontend's id; 0 when no frontend matched */
	__u32 pid;        /* socket hooks: the calling process (thread group id) */
	__u16 reason;     /* enum veer_counter: the verdict, as counted */
	__u8 hook;        /* VEER_HOOK_* */
	__u8 flags;       /* VEER_EV_F_* */
	char comm[16];    /* socket hooks: the calling task's name */
	__u16 rule;       /* access verdicts: the deciding rule, VEER_RULE_DEFAULT for the default */
	__u8 pad[2];
};

/* Runtime switches the agent writes (an array of one, key 0). */
struct veer_config {
	__u32 trace_translations; /* 1: report translations too, not only refusals/drops */
	__u32 pad;
};

#endif /* VEER_STRUCTS_H */
