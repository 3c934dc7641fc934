/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-packet NAT for traffic that no socket hook saw: packets arriving at the
 * node from outside, addressed to a NodePort, an externalIP or a
 * LoadBalancer IP. Attached with TC (clsact) to the node's devices.
 *
 * Ingress, for each IPv4 or IPv6 TCP/UDP packet:
 *   1. a reply to a flow we source-NATed (addressed to the node's SNAT port):
 *      restore it (frontend -> client) and send it back out;
 *   2. a packet of a flow we already translated: translate it the same way
 *      (a flow keeps its backend for its lifetime);
 *   3. the first packet to an external frontend: choose a backend from the
 *      frontend's external scope, DNAT to it, and if the backend lies behind
 *      the device the packet came in on (another node) and the policy is
 *      Cluster, SNAT to the node's address so the reply comes back here
 *      (in DSR mode: send it on un-SNATed, telling that node the frontend,
 *      see "DSR" below); record both directions in the NAT maps;
 *   4. (DSR mode) a DSR flow's packet from another node for a local backend:
 *      veer_tc_dsr, tail-called.
 * Translated packets are forwarded with a FIB lookup and a redirect (with the
 * MAC addresses the lookup returned, or bpf_redirect_neigh given the next hop
 * when the neighbour is not resolved yet): the stack would drop a packet whose
 * source is now one of its own addresses ("martian"), and the redirect also
 * skips a second routing pass.
 *
 * Egress: replies of local backends to external clients leave through the
 * device un-SNATed; their source is restored to the frontend here (the
 * frontend of this node, or, for a DSR flow, of the node that sent it).
 *
 * Also: loadBalancerSourceRanges (clients outside are dropped), ClientIP
 * affinity keyed by the client's address, and pods of the cluster
 * (--cluster-cidr) reaching an externalTrafficPolicy: Local frontend are
 * served from every endpoint with SNAT (kube-proxy's short-circuit).
 *
 * Verdicts on new flows are reported to the agent through veer_report()
 * (veer_helpers.c): drops, denials and failures always, new flows while the
 * agent asks.
 *
 * Not yet: IPv4 options, IPv6 extension headers (but veer's own DSR carrier)
 * and fragments (passed untouched), ICMP errors for translated flows. A frontend without any
 * endpoint answers ICMP port unreachable, as kube-proxy's REJECT does; one
 * that is empty only here under a Local policy drops.
 */
#include "veer_common.h"

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#define VEER_AF_INET 2
#define VEER_AF_INET6 10
#define VEER_IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define VEER_IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define VEER_IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define VEER_TCP_CSUM_OFF 16
#define VEER_UDP_CSUM_OFF 6
#define VEER_SNAT_PORT_MIN 32768
#define VEER_SNAT_PORT_RANGE 28232 /* 32768..60999, Linux's default ephemeral range */
#define VEER_SNAT_TRIES 16

/* BCC 0.26 declares bpf_redirect_neigh with three parameters; the kernel's
 * helper takes four (ifindex, params, plen, flags). */
static long (*veer_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

struct veer_pkt {
	struct veer_tuple t;
	__u32 iif; /* the device it came in on (skb->ingress_ifindex, read once: clang
		    * may keep a context field's address for a second read, which the
		    * verifier refuses) */
	__u32 l4_off;
	__u32 csum_off;
	__u8 udp;
	__u8 rst; /* a TCP RST: the connection is over */
	__u8 syn; /* a TCP SYN without ACK: the first packet of a connection */
	__u8 fin; /* a TCP FIN or RST: the connection is ending */
};

#define VEER_TCP_FLAGS_OFF 13
#define VEER_TCP_FIN 0x01
#define VEER_TCP_SYN 0x02
#define VEER_TCP_RST 0x04
#define VEER_TCP_ACK 0x10
#define VEER_SYN_REUSE_NS 3000000000ULL /* a SYN retransmit comes within 1-3 s */
#define VEER_UDP_IDLE_NS 180000000000ULL /* conntrack's udp_timeout_stream */
/* A TCP flow whose both directions sent a FIN, or that saw a RST, is marked
 * closing (the top bit of last_seen_ns, which bpf_ktime_get_ns() never
 * reaches) in both entries, and an entry is dead once it has been quiet this
 * long after that: its ports, SNAT port included, are free again. Without this, finished connections would hold their SNAT
 * ports until the LRU map filled up, and new flows would fail long before.
 * Ten seconds lets the last ACKs and retransmissions through. A port taken
 * over for another client while the backend still holds the old connection
 * in TIME_WAIT may meet a challenge ACK and cost that client a SYN
 * retransmission; SNAT prefers the client's own port to make that rare. */
#define VEER_NAT_CLOSING (1ULL << 63)
#define VEER_TCP_CLOSED_NS 10000000000ULL
/* A forward entry of a flow sent on by DSR (the next bit down): its SYNs (and
 * every UDP datagram) carry the frontend to the backend's node. */
#define VEER_NAT_DSR (1ULL << 62)
/* An entry whose direction sent a FIN while the other has not (yet): the
 * connection is half closed, and the other side may go on sending for as
 * long as it likes. Dead only after conntrack's FIN_WAIT time of quiet. */
#define VEER_NAT_FIN (1ULL << 61)
#define VEER_TCP_HALF_CLOSED_NS 120000000000ULL
#define VEER_NAT_FLAGS (VEER_NAT_CLOSING | VEER_NAT_DSR | VEER_NAT_FIN)
/* veer_new_flow's answer "refuse this packet" (not a TC_ACT_* value). */
#define VEER_TC_REJECT (-100)
/* Programs veer_tc_ingress tail-calls, by index in veer_tc_tail. */
#define VEER_TAIL_REJECT 0
#define VEER_TAIL_DSR 1

BPF_PROG_ARRAY(veer_tc_tail, 2);

/* NodePort mode, chosen when the agent compiles the programs
 * (--nodeport-mode): 0 SNAT (the default), 1 DSR. */
#ifndef VEER_NODEPORT_DSR
#define VEER_NODEPORT_DSR 0
#endif

/* ---- DSR: what the ingress node tells the backend's node -------------------
 *
 * In DSR mode a flow from outside whose backend is on another node is not
 * source-NATed: the ingress node only DNATs, and the backend's node sends the
 * replies straight to the client, from the frontend's address and port. To
 * do that it must learn the frontend, which the DNATed packet no longer
 * names: the ingress node adds it to the flow's first packet, every SYN and
 * every UDP datagram that has room for it, and the backend's node records
 * the reply tuple (backend -> client) -> (frontend -> client) in veer_nat_rev,
 * removes what was added, and lets the packet go on to the pod. veer_tc_egress
 * then restores the replies there as it does for local backends.
 *
 * IPv4: an IP option right after the 20-byte header. Type 158 (copied, class
 * 0, number 30: RFC 4727's experimental option), length 8: the frontend's
 * address, then its port. */
#define VEER_DSR_OPT4_TYPE 158
struct veer_dsr_opt4 {
	__u8 type;
	__u8 len;
	__u8 addr[4];
	__be16 port;
};

/* IPv6: a Destination Options header right after the fixed header, holding
 * one option of type 0x1e (RFC 4727's experimental type; its top bits 00 tell
 * a node that does not know it to skip it) with the frontend's address and
 * port, and a PadN to the 8-byte multiple the header needs. */
#define VEER_DSR_OPT6_TYPE 0x1e
#define VEER_IPPROTO_DSTOPTS 60
struct veer_dsr_opt6 {
	__u8 nexthdr;  /* the L4 protocol that follows */
	__u8 hdrlen;   /* in 8-byte units, not counting the first 8: 2 */
	__u8 type;
	__u8 len;      /* 18 */
	__u8 addr[16];
	__be16 port;
	__u8 pad_type; /* PadN */
	__u8 pad_len;  /* 0 */
};

/* The ports and TCP flags that follow an IP header at `l4`. */
static __always_inline int veer_parse_l4(struct veer_pkt *p, void *l4, void *end, __u8 proto)
{
	__be16 *ports = l4;

	if (proto != VEER_IPPROTO_TCP && proto != VEER_IPPROTO_UDP)
		return -1;
	if ((void *)(ports + 2) > end)
		return -1;
	p->t.sport = ports[0];
	p->t.dport = ports[1];
	p->t.proto = proto;
	p->udp = proto == VEER_IPPROTO_UDP;
	p->csum_off = p->l4_off + (p->udp ? VEER_UDP_CSUM_OFF : VEER_TCP_CSUM_OFF);
	if (!p->udp) {
		__u8 *flags = (__u8 *)l4 + VEER_TCP_FLAGS_OFF;

		if ((void *)(flags + 1) > end)
			return -1;
		p->syn = (*flags & (VEER_TCP_SYN | VEER_TCP_ACK)) == VEER_TCP_SYN;
		p->fin = (*flags & (VEER_TCP_FIN | VEER_TCP_RST)) != 0;
		p->rst = (*flags & VEER_TCP_RST) != 0;
	}
	return 0;
}

/* veer_parse's answer for an IPv4 header with 8 bytes of options or an IPv6
 * destination options header: perhaps a DSR flow's first packet (see
 * veer_tc_dsr); not translated otherwise. */
#define VEER_PARSE_OPTIONS 1

/* Parse a TCP/UDP packet over IPv4 (no options, not a fragment) or IPv6 (no
 * extension headers): 0. Anything else is not ours: -1, or
 * VEER_PARSE_OPTIONS. */
static __always_inline int veer_parse(struct __sk_buff *skb, struct veer_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memset(p, 0, sizeof(*p));
	p->iif = skb->ingress_ifindex;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->ihl != 5)
			return ip->ihl == 7 ? VEER_PARSE_OPTIONS : -1;
		if (ip->frag_off & bpf_htons(0x3fff))
			return -1;
		__builtin_memcpy(p->t.saddr, &ip->saddr, 4);
		__builtin_memcpy(p->t.daddr, &ip->daddr, 4);
		p->t.family = VEER_FAMILY_IPV4;
		p->l4_off = ETH_HLEN + sizeof(struct iphdr);
		return veer_parse_l4(p, ip + 1, end, ip->protocol);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
		p->t.family = VEER_FAMILY_IPV6;
		p->l4_off = ETH_HLEN + sizeof(struct ipv6hdr);
		if (ip6->nexthdr == VEER_IPPROTO_DSTOPTS)
			return VEER_PARSE_OPTIONS;
		return veer_parse_l4(p, ip6 + 1, end, ip6->nexthdr);
	}
	return -1;
}

/* Rewrite the packet's addresses and ports from p->t to `to`, with as few
 * helper calls as the change needs: one checksum difference over both
 * addresses, applied to the IPv4 header checksum and, as a pseudo-header
 * change, to the L4 checksum; the two ports as one 32-bit word (not a
 * pseudo-header change: the L4 checksum of a CHECKSUM_PARTIAL packet is
 * finished later over the ports as written); one store for the addresses and
 * one for the ports. A UDP checksum of 0 (none, IPv4 only) stays 0
 * (MANGLED_0). */
static __always_inline void veer_rewrite(struct __sk_buff *skb, const struct veer_pkt *p,
					 const struct veer_nat_value *to)
{
	__u64 mangled = p->udp ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 from[8], next[8];
	__u32 from_ports, to_ports;
	__s64 diff;

	if (p->t.family == VEER_FAMILY_IPV4) {
		__builtin_memcpy(&from[0], p->t.saddr, 4);
		__builtin_memcpy(&from[1], p->t.daddr, 4);
		__builtin_memcpy(&next[0], to->saddr, 4);
		__builtin_memcpy(&next[1], to->daddr, 4);
		if (from[0] != next[0] || from[1] != next[1]) {
			diff = bpf_csum_diff(from, 8, next, 8, 0);
			bpf_l3_csum_replace(skb, VEER_IP_CSUM_OFF, 0, diff, 0);
			bpf_l4_csum_replace(skb, p->csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled);
			bpf_skb_store_bytes(skb, VEER_IP_SRC_OFF, next, 8, 0);
		}
	} else if (!veer_same_addr(p->t.saddr, to->saddr) ||
		   !veer_same_addr(p->t.daddr, to->daddr)) {
		__builtin_memcpy(from, p->t.saddr, 16);
		__builtin_memcpy(&from[4], p->t.daddr, 16);
		__builtin_memcpy(next, to->saddr, 16);
		__builtin_memcpy(&next[4], to->daddr, 16);
		diff = bpf_csum_diff(from, 32, next, 32, 0);
		bpf_l4_csum_replace(skb, p->csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled);
		bpf_skb_store_bytes(skb, VEER_IP6_SRC_OFF, next, 32, 0);
	}
	from_ports = (__u32)p->t.sport | ((__u32)p->t.dport << 16);
	to_ports = (__u32)to->sport | ((__u32)to->dport << 16);
	if (from_ports != to_ports) {
		bpf_l4_csum_replace(skb, p->csum_off, from_ports, to_ports, mangled | 4);
		bpf_skb_store_bytes(skb, p->l4_off, &to_ports, 4, 0);
	}
}

/* veer_route's answer when the packet would not fit the route's MTU with the
 * bytes the caller means to add. */
#define VEER_ROUTE_TOO_BIG (-2)
/* veer_route's answer when the destination is this node's own address: a
 * backend in the host's network (a hostNetwork pod), served by this node's
 * stack, not forwarded. */
#define VEER_ROUTE_LOCAL (-3)

/* Where a packet from `saddr` to `daddr` that came in through device `iif`
 * leaves this node: the FIB lookup's answer, BPF_FIB_LKUP_RET_SUCCESS or
 * _NO_NEIGH, with `fib` filled; VEER_ROUTE_LOCAL for an address of this
 * node; -1 when it cannot be forwarded (no route, ...). `grow`: bytes the
 * caller will add to the packet; VEER_ROUTE_TOO_BIG when it would then
 * exceed the route's MTU. */
static __always_inline int veer_route(struct __sk_buff *skb, __u32 iif, __u8 family,
				      const __u8 *saddr, const __u8 *daddr,
				      struct bpf_fib_lookup *fib, __u32 grow)
{
	int rc;

	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = iif;
	if (grow)
		fib->tot_len = skb->len - ETH_HLEN + grow;
	if (family == VEER_FAMILY_IPV4) {
		fib->family = VEER_AF_INET;
		__builtin_memcpy(&fib->ipv4_src, saddr, 4);
		__builtin_memcpy(&fib->ipv4_dst, daddr, 4);
	} else {
		fib->family = VEER_AF_INET6;
		__builtin_memcpy(fib->ipv6_src, saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, daddr, 16);
	}
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return rc;
	if (grow && rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return VEER_ROUTE_TOO_BIG;
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return VEER_ROUTE_LOCAL;
	return -1;
}

/* Whether `addr` is the next hop of the route veer_route() found: the
 * destination itself when the route has no gateway (bpf_fib_lookup returns
 * the gateway's address in place of the destination). */
static __always_inline int veer_next_hop_is(const struct bpf_fib_lookup *fib, __u8 family,
					    const __u8 *addr)
{
	__u32 want[4];

	__builtin_memcpy(want, addr, 16);
	if (family == VEER_FAMILY_IPV4)
		return fib->ipv4_dst == want[0];
	return !((fib->ipv6_dst[0] ^ want[0]) | (fib->ipv6_dst[1] ^ want[1]) |
		 (fib->ipv6_dst[2] ^ want[2]) | (fib->ipv6_dst[3] ^ want[3]));
}

/* Whether the route found to a backend goes through a gateway. A pod of
 * this node is reached on a link of its own (a veth, a bridge), without
 * one; a pod of another node through that node or a tunnel (an overlay:
 * VXLAN, IP-in-IP), with one, and possibly by another device than the one
 * the client's packet came in on. */
static __always_inline int veer_via_gateway(const struct bpf_fib_lookup *fib, __u8 family,
					    const __u8 *daddr)
{
	return !veer_next_hop_is(fib, family, daddr);
}

/* bpf_redirect_neigh's parameters (struct bpf_redir_neigh): the next hop. */
struct veer_redir_neigh {
	__u32 nh_family;
	__u8 nh[16];
};

/* Send a translated packet out where veer_route() found, without a second
 * route lookup: when the lookup knew the neighbour (SUCCESS), write the MAC
 * addresses it returned and redirect; otherwise hand bpf_redirect_neigh the
 * next hop it found (without one, that helper looks the route up again). */
static __always_inline int veer_send(struct __sk_buff *skb, int route,
					const struct bpf_fib_lookup *fib)
{
	struct veer_redir_neigh nh = {};
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if (route == BPF_FIB_LKUP_RET_SUCCESS) {
		if ((void *)(eth + 1) > end)
			return TC_ACT_SHOT;
		__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
		return bpf_redirect(fib->ifindex, 0);
	}
	nh.nh_family = fib->family;
	if (fib->family == VEER_AF_INET)
		__builtin_memcpy(nh.nh, &fib->ipv4_dst, 4);
	else
		__builtin_memcpy(nh.nh, fib->ipv6_dst, 16);
	return veer_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

/* Report a verdict on the packet `p` (see veer_report). */
static __always_inline void veer_report_tc(struct __sk_buff *skb, __u32 reason,
					   const struct veer_pkt *p, __u32 service_id,
					   const __u8 *baddr, __be16 bport, __u8 flags)
{
	veer_report(skb, VEER_HOOK_TC_INGRESS, reason, flags, service_id, p->t.family,
		    p->t.proto, p->t.saddr, p->t.sport, p->t.daddr, p->t.dport, baddr, bport);
}

/* How long before `now` a NAT entry last saw a packet. Another CPU may
 * refresh the entry after this one read its clock: then the entry is newer
 * than `now`, and its age is 0, not a wrapped-around eternity. */
static __always_inline __u64 veer_nat_age(const struct veer_nat_value *nat, __u64 now)
{
	__u64 seen = nat->last_seen_ns & ~VEER_NAT_FLAGS;

	return seen < now ? now - seen : 0;
}

/* Whether a NAT entry, on its own, outlived its flow. UDP has no end: an
 * entry idle for longer than conntrack's UDP timeout is dead (its ports may
 * be reused by an unrelated flow). TCP entries end when a new SYN reuses
 * their ports. */
static __always_inline int veer_nat_stale(const struct veer_tuple *t,
					  const struct veer_nat_value *nat, __u64 now)
{
	__u64 idle = veer_nat_age(nat, now);

	if (t->proto == VEER_IPPROTO_UDP)
		return idle > VEER_UDP_IDLE_NS;
	if (nat->last_seen_ns & VEER_NAT_CLOSING)
		return idle > VEER_TCP_CLOSED_NS;
	return (nat->last_seen_ns & VEER_NAT_FIN) && idle > VEER_TCP_HALF_CLOSED_NS;
}

/* The key of the other direction's entry of a NAT entry's flow: the entry's
 * rewritten tuple reversed (a forward entry's gives the reply key, a reverse
 * entry's the forward key). */
static __always_inline void veer_nat_other_key(const struct veer_nat_value *nat, __u8 proto,
					       __u8 family, struct veer_tuple *key)
{
	__builtin_memcpy(key->saddr, nat->daddr, 16);
	__builtin_memcpy(key->daddr, nat->saddr, 16);
	key->sport = nat->dport;
	key->dport = nat->sport;
	key->proto = proto;
	key->family = family;
}

/* Whether a UDP flow is over: each direction's entry is refreshed only by
 * its own packets, so one that streams one way (a client that only sends,
 * a server that only pushes) has an idle entry for the other. The flow
 * lives while either entry does. `reverse`: `nat` is a reverse entry. TCP
 * entries are judged alone (a FIN or RST marks both). */
static __always_inline int veer_flow_stale(const struct veer_tuple *t,
					   const struct veer_nat_value *nat, int reverse,
					   __u64 now)
{
	struct veer_nat_value *other;
	struct veer_tuple key = {};

	if (!veer_nat_stale(t, nat, now))
		return 0;
	if (t->proto != VEER_IPPROTO_UDP)
		return 1;
	veer_nat_other_key(nat, t->proto, t->family, &key);
	other = reverse ? veer_nat_fwd.lookup(&key) : veer_nat_rev.lookup(&key);
	return !other || veer_nat_stale(&key, other, now);
}

/* Note a packet of a NAT entry's flow at time `now`: refresh its time; a
 * FIN marks its direction done, a RST or the second direction's FIN marks
 * both entries closing (the marks stay). */
static __always_inline void veer_nat_seen(struct veer_nat_value *nat, const struct veer_pkt *p,
					  int reply, __u64 now)
{
	__u64 flags = nat->last_seen_ns & VEER_NAT_FLAGS;
	struct veer_nat_value *other;
	struct veer_tuple key = {};

	if (p->fin)
		flags |= p->rst ? VEER_NAT_CLOSING : VEER_NAT_FIN;
	nat->last_seen_ns = now | flags;
	if (!p->fin)
		return;
	/* The other direction's entry: a RST ends both (a client's RST never
	 * passes the reply path, yet it frees the SNAT port), so does a FIN
	 * when the other side has sent its own, or when there is no other
	 * entry to learn that from. The flow's LeastConnections count, if any,
	 * ends with the first FIN or RST; it is keyed by its forward tuple:
	 * this packet's (a client's packet) or the other key (a reply). */
	veer_nat_other_key(nat, p->t.proto, p->t.family, &key);
	if (reply) {
		other = veer_nat_fwd.lookup(&key);
		veer_lc_flow_release(&key);
	} else {
		other = veer_nat_rev.lookup(&key);
		veer_lc_flow_release(&p->t);
	}
	if (!other || p->rst || (other->last_seen_ns & VEER_NAT_FIN)) {
		nat->last_seen_ns |= VEER_NAT_CLOSING;
		if (other)
			other->last_seen_ns |= VEER_NAT_CLOSING;
	}
}

/* The tuple of the replies to a packet of tuple `t`. */
static __always_inline void veer_reply_tuple(const struct veer_tuple *t,
					     struct veer_tuple *reply)
{
	__builtin_memcpy(reply->saddr, t->daddr, 16);
	__builtin_memcpy(reply->daddr, t->saddr, 16);
	reply->sport = t->dport;
	reply->dport = t->sport;
	reply->proto = t->proto;
	reply->family = t->family;
}

/* The reverse entry a packet's flow would have if we had translated it. A new
 * connection that we do not translate (pod to pod across nodes, say) may
 * reuse the ports of an old translated one; its replies must not be
 * "restored" to the old frontend, so its SYN removes the old entry. */
static __always_inline void veer_forget_reverse(const struct veer_pkt *p)
{
	struct veer_tuple reply = {};

	veer_reply_tuple(&p->t, &reply);
	/* Deleting takes the bucket's lock even when there is nothing to delete;
	 * looking first does not, and there is rarely anything. */
	if (veer_nat_rev.lookup(&reply))
		veer_nat_rev.delete(&reply);
}

/* The VEER_TC_ADDR_* flags veer_tc_addrs holds for `addr` (0: none). */
static __always_inline __u32 veer_tc_addr_flags(const __u8 *addr, __u8 family)
{
	struct veer_vip_key key = {};
	struct veer_vip_value *found;

	__builtin_memcpy(key.addr, addr, 16);
	key.family = family;
	found = veer_tc_addrs.lookup(&key);
	return found ? found->flags : 0;
}

/* Whether the client may use a frontend with loadBalancerSourceRanges. */
static __always_inline int veer_source_allowed(__u32 service_id, const struct veer_tuple *t)
{
	struct veer_source_key key = {};

	key.prefixlen = 32 + 32 + 128;
	key.service_id = service_id;
	key.family = t->family;
	__builtin_memcpy(key.addr, t->saddr, 16);
	return veer_lb_sources.lookup(&key) != NULL;
}

/* Whether the client address lies in the cluster's pod CIDRs. */
static __always_inline int veer_from_pod(const struct veer_tuple *t)
{
	struct veer_cidr_key key = {};

	key.prefixlen = 32 + 128;
	key.family = t->family;
	__builtin_memcpy(key.addr, t->saddr, 16);
	return veer_cluster_cidrs.lookup(&key) != NULL;
}

/* Bytes a DSR carrier adds to a packet of family `family`. */
static __always_inline __u32 veer_dsr_len(__u8 family)
{
	return family == VEER_FAMILY_IPV4 ? sizeof(struct veer_dsr_opt4)
					  : sizeof(struct veer_dsr_opt6);
}

/* The IPv4 header checksum `check` after its header's words changed by
 * `diff` (a bpf_csum_diff result). */
static __always_inline __be16 veer_csum_update(__be16 check, __s64 diff)
{
	__u64 sum = (__u64)(__u16)~check + (__u32)diff;

	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__be16)~sum;
}

/* Add the DSR carrier naming the frontend p->t.daddr:p->t.dport (the packet
 * as it arrived) to a packet already DNATed (see veer_dsr_opt4/6). Headers
 * are written with BPF_F_RECOMPUTE_CSUM so that a CHECKSUM_COMPLETE sum stays
 * right; the L4 checksum does not change (its pseudo-header counts the L4
 * length only). 0, or -1 when the packet could not grow. */
static __always_inline int veer_dsr_push(struct __sk_buff *skb, const struct veer_pkt *p)
{
	if (p->t.family == VEER_FAMILY_IPV4) {
		struct {
			__be32 w0; /* version+ihl, tos, tot_len */
			struct veer_dsr_opt4 opt;
		} next;
		__be32 w0;
		__be16 check;
		__s64 diff;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &w0, 4) < 0 ||
		    bpf_skb_load_bytes(skb, VEER_IP_CSUM_OFF, &check, 2) < 0)
			return -1;
		next.w0 = w0;
		((__u8 *)&next.w0)[0] = 0x47; /* version 4, 7 words of header */
		((__be16 *)&next.w0)[1] =
			bpf_htons(bpf_ntohs(((__be16 *)&w0)[1]) + sizeof(struct veer_dsr_opt4));
		next.opt.type = VEER_DSR_OPT4_TYPE;
		next.opt.len = sizeof(struct veer_dsr_opt4);
		__builtin_memcpy(next.opt.addr, p->t.daddr, 4);
		next.opt.port = p->t.dport;
		diff = bpf_csum_diff(&w0, 4, (__be32 *)&next, sizeof(next), 0);
		check = veer_csum_update(check, diff);
		if (bpf_skb_adjust_room(skb, sizeof(struct veer_dsr_opt4), BPF_ADJ_ROOM_NET, 0))
			return -1;
		bpf_skb_store_bytes(skb, ETH_HLEN, &next.w0, 4, BPF_F_RECOMPUTE_CSUM);
		bpf_skb_store_bytes(skb, VEER_IP_CSUM_OFF, &check, 2, BPF_F_RECOMPUTE_CSUM);
		bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &next.opt,
				    sizeof(next.opt), BPF_F_RECOMPUTE_CSUM);
		return 0;
	} else {
		struct veer_dsr_opt6 opt = {};
		__u8 hdr[4]; /* payload_len, nexthdr, hop_limit */
		__u16 len;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + 4, hdr, 4) < 0)
			return -1;
		opt.nexthdr = hdr[2];
		opt.hdrlen = sizeof(opt) / 8 - 1;
		opt.type = VEER_DSR_OPT6_TYPE;
		opt.len = 18;
		__builtin_memcpy(opt.addr, p->t.daddr, 16);
		opt.port = p->t.dport;
		opt.pad_type = 1; /* PadN of no data: the 2 bytes left */
		len = ((__u16)hdr[0] << 8 | hdr[1]) + sizeof(opt);
		hdr[0] = len >> 8;
		hdr[1] = len & 0xff;
		hdr[2] = VEER_IPPROTO_DSTOPTS;
		if (bpf_skb_adjust_room(skb, sizeof(opt), BPF_ADJ_ROOM_NET, 0))
			return -1;
		bpf_skb_store_bytes(skb, ETH_HLEN + 4, hdr, 4, BPF_F_RECOMPUTE_CSUM);
		bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct ipv6hdr), &opt, sizeof(opt),
				    BPF_F_RECOMPUTE_CSUM);
		return 0;
	}
}

/* Whether a new flow to a backend on another node (behind the device it came
 * in on) may go there by DSR. Not when the client is a pod of the cluster,
 * nor when it is the backend's node itself (the next hop towards the
 * backend): the backend's replies to those never leave its node by that
 * node's device, where they would be restored. */
static __always_inline int veer_dsr_allowed(const struct veer_pkt *p,
					    const struct bpf_fib_lookup *fib)
{
	if (veer_from_pod(&p->t))
		return 0;
	return !veer_next_hop_is(fib, p->t.family, p->t.saddr);
}

/* Translate a packet of a known flow, seen at `now`, and send it on its way.
 * A flow sent by DSR carries its frontend again on every SYN (a retransmitted
 * one may be the first to arrive) and every UDP datagram (so that the
 * backend's node keeps its entry while the client talks), when there is room
 * under the MTU; otherwise the backend's node has it from an earlier packet. */
static __always_inline int veer_apply(struct __sk_buff *skb, const struct veer_pkt *p,
				      struct veer_nat_value *to, int reply, __u64 now)
{
	struct bpf_fib_lookup fib;
	__u32 carry = 0;
	int route;

	veer_nat_seen(to, p, reply, now);
	veer_rewrite(skb, p, to);
	if ((to->last_seen_ns & VEER_NAT_DSR) && (p->syn || p->udp))
		carry = veer_dsr_len(p->t.family);
	route = veer_route(skb, p->iif, p->t.family, to->saddr, to->daddr, &fib, carry);
	if (route == VEER_ROUTE_TOO_BIG) {
		carry = 0;
		route = veer_route(skb, p->iif, p->t.family, to->saddr, to->daddr, &fib, 0);
	}
	/* To this node's own stack: a host-network backend, or (a reply) the
	 * node's own connection that veer_host_flow moved to another port. */
	if (route == VEER_ROUTE_LOCAL)
		return TC_ACT_OK;
	if (route < 0 || (carry && veer_dsr_push(skb, p) < 0)) {
		veer_count(VEER_CNT_NAT_FAIL);
		veer_report_tc(skb, VEER_CNT_NAT_FAIL, p, to->service_id, to->daddr, to->dport, 0);
		return TC_ACT_SHOT;
	}
	return veer_send(skb, route, &fib);
}

/* The backend a client's live per-packet affinity entry names, or 0. */
static __always_inline __u32 veer_ext_affinity_lookup(struct veer_ext_affinity_key *key,
						      __u32 timeout_seconds)
{
	return veer_affinity_backend(veer_ext_affinity.lookup(key), key->service_id,
				     VEER_SCOPE_EXTERNAL, timeout_seconds);
}

/* A new flow could not be set up (no route, no SNAT address or port, a NAT
 * map write failed): report it with the backend that was chosen. */
static __always_inline void veer_nat_failed(struct __sk_buff *skb, const struct veer_pkt *p,
					    __u32 service_id,
					    const struct veer_backend_value *backend, __u8 flags)
{
	veer_report_tc(skb, VEER_CNT_NAT_FAIL, p, service_id, backend->addr, backend->port, flags);
}

/* ICMP messages that refuse a packet: header, then the start of the packet
 * refused (its IP header and 8 bytes of L4, as RFC 792 / RFC 4443 ask). */
struct veer_icmp4_refusal {
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
	__u8 orig[sizeof(struct iphdr) + 8];
};

struct veer_icmp6_refusal {
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
	__u8 orig[sizeof(struct ipv6hdr) + 8];
};

struct veer_ip6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__be32 next;
};

static __always_inline __u16 veer_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Scratch space for building a refusal: too big for the stack next to
 * veer_new_flow's locals (BPF allows 512 bytes in all). One per CPU. */
struct veer_reject_scratch {
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__u8 pad[2];
	struct veer_icmp4_refusal msg4;
	struct iphdr ip4;
	struct veer_icmp6_refusal msg6;
	struct veer_ip6_pseudo pseudo;
	struct ipv6hdr ip6;
};

BPF_PERCPU_ARRAY(veer_reject_scratch, struct veer_reject_scratch, 1);

/* Refuse a packet the way kube-proxy's REJECT does: turn it into an ICMP
 * "port unreachable" (ICMPv6 for IPv6) from the address it was sent to, and
 * send that back out the device it came in on. The client's connect() then
 * fails at once with ECONNREFUSED instead of timing out. */
static __always_inline int veer_reject(struct __sk_buff *skb, const struct veer_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct veer_reject_scratch *w;
	__u32 zero = 0;
	__s64 sum;

	w = veer_reject_scratch.lookup(&zero);
	if (!w || data + ETH_HLEN > end)
		return TC_ACT_SHOT;
	__builtin_memset(w, 0, sizeof(*w));
	__builtin_memcpy(&w->eth, data, ETH_HLEN);
	__builtin_memcpy(w->mac, w->eth.h_dest, ETH_ALEN);
	__builtin_memcpy(w->eth.h_dest, w->eth.h_source, ETH_ALEN);
	__builtin_memcpy(w->eth.h_source, w->mac, ETH_ALEN);

	if (p->t.family == VEER_FAMILY_IPV4) {
		if (data + ETH_HLEN + sizeof(w->msg4.orig) > end)
			return TC_ACT_SHOT;
		__builtin_memcpy(w->msg4.orig, data + ETH_HLEN, sizeof(w->msg4.orig));
		w->msg4.type = 3; /* destination unreachable */
		w->msg4.code = 3; /* port unreachable */
		w->msg4.check = veer_csum_fold(
			bpf_csum_diff(NULL, 0, (__be32 *)&w->msg4, sizeof(w->msg4), 0));
		w->ip4.version = 4;
		w->ip4.ihl = 5;
		w->ip4.ttl = 64;
		w->ip4.protocol = 1; /* ICMP */
		w->ip4.tot_len = bpf_htons(sizeof(w->ip4) + sizeof(w->msg4));
		__builtin_memcpy(&w->ip4.saddr, p->t.daddr, 4);
		__builtin_memcpy(&w->ip4.daddr, p->t.saddr, 4);
		w->ip4.check = veer_csum_fold(
			bpf_csum_diff(NULL, 0, (__be32 *)&w->ip4, sizeof(w->ip4), 0));
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(w->ip4) + sizeof(w->msg4), 0))
			return TC_ACT_SHOT;
		bpf_skb_store_bytes(skb, 0, &w->eth, ETH_HLEN, 0);
		bpf_skb_store_bytes(skb, ETH_HLEN, &w->ip4, sizeof(w->ip4), 0);
		bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(w->ip4), &w->msg4, sizeof(w->msg4), 0);
	} else {
		if (data + ETH_HLEN + sizeof(w->msg6.orig) > end)
			return TC_ACT_SHOT;
		__builtin_memcpy(w->msg6.orig, data + ETH_HLEN, sizeof(w->msg6.orig));
		w->msg6.type = 1; /* destination unreachable */
		w->msg6.code = 4; /* port unreachable */
		__builtin_memcpy(w->pseudo.saddr, p->t.daddr, 16);
		__builtin_memcpy(w->pseudo.daddr, p->t.saddr, 16);
		w->pseudo.len = bpf_htonl(sizeof(w->msg6));
		w->pseudo.next = bpf_htonl(58); /* ICMPv6 */
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&w->pseudo, sizeof(w->pseudo), 0);
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&w->msg6, sizeof(w->msg6), sum);
		w->msg6.check = veer_csum_fold(sum);
		w->ip6.version = 6;
		w->ip6.payload_len = bpf_htons(sizeof(w->msg6));
		w->ip6.nexthdr = 58;
		w->ip6.hop_limit = 64;
		__builtin_memcpy(&w->ip6.saddr, p->t.daddr, 16);
		__builtin_memcpy(&w->ip6.daddr, p->t.saddr, 16);
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(w->ip6) + sizeof(w->msg6), 0))
			return TC_ACT_SHOT;
		bpf_skb_store_bytes(skb, 0, &w->eth, ETH_HLEN, 0);
		bpf_skb_store_bytes(skb, ETH_HLEN, &w->ip6, sizeof(w->ip6), 0);
		bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(w->ip6), &w->msg6, sizeof(w->msg6), 0);
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* A new flow's NAT entries while they are built: kept off the stack, which
 * veer_new_flow would otherwise nearly fill (BPF allows 512 bytes). */
struct veer_flow_scratch {
	struct veer_nat_value fwd;
	struct veer_nat_value rev;
	struct veer_tuple reply;
	struct bpf_sock_tuple sk; /* veer_port_owned's question */
};

BPF_PERCPU_ARRAY(veer_flow_scratch, struct veer_flow_scratch, 1);

/* A TrafficPolicy's access rules on a new flow from outside: a denied
 * client's packet is dropped (reported with the deciding rule). */
static __always_inline int veer_tc_access(struct __sk_buff *skb, const struct veer_pkt *p,
					  const struct veer_service_value *frontend)
{
	__u16 rule;

	if (veer_access_allowed(frontend->service_id, frontend->flags, p->t.family, p->t.saddr,
				&rule))
		return 1;
	veer_count(VEER_CNT_NAT_ACCESS_DENIED);
	veer_report_rule(skb, VEER_HOOK_TC_INGRESS, VEER_CNT_NAT_ACCESS_DENIED, 0,
			 frontend->service_id, p->t.family, p->t.proto, p->t.saddr, p->t.sport,
			 p->t.daddr, p->t.dport, NULL, 0, rule);
	return 0;
}

/* Whether a socket of this node owns the reply tuple w->reply (backend ->
 * node address and port): the node's own connection to that backend from
 * that port, or a socket bound to the port. The backend could not tell a flow
 * source-NATed to those ports from that connection, and veer_nat_rev knows
 * only veer's flows: the kernel's socket table knows the node's (conntrack,
 * which kube-proxy's SNAT relies on, sees both). */
static __always_inline int veer_port_owned(struct __sk_buff *skb, struct veer_flow_scratch *w)
{
	struct bpf_sock_tuple *t = &w->sk;
	struct bpf_sock *sk;
	__u32 len;

	if (w->reply.family == VEER_FAMILY_IPV4) {
		__builtin_memcpy(&t->ipv4.saddr, w->reply.saddr, 4);
		__builtin_memcpy(&t->ipv4.daddr, w->reply.daddr, 4);
		t->ipv4.sport = w->reply.sport;
		t->ipv4.dport = w->reply.dport;
		len = sizeof(t->ipv4);
	} else {
		__builtin_memcpy(t->ipv6.saddr, w->reply.saddr, 16);
		__builtin_memcpy(t->ipv6.daddr, w->reply.daddr, 16);
		t->ipv6.sport = w->reply.sport;
		t->ipv6.dport = w->reply.dport;
		len = sizeof(t->ipv6);
	}
	if (w->reply.proto == VEER_IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(skb, t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Pick w->fwd's source port for a flow leaving from w->fwd.saddr, and
 * reserve it by inserting w->reply (its reply tuple, filled but for the
 * destination port) into veer_nat_rev with the value w->rev (a few tries).
 * `keep`: try the flow's own source port first. -1 when every port tried is
 * taken. */
static __always_inline int veer_snat_port(struct __sk_buff *skb, const struct veer_pkt *p,
					  struct veer_flow_scratch *w, int keep)
{
	struct veer_nat_value *held;
	__u32 hash, i;

	hash = bpf_get_prandom_u32();
#pragma unroll
	for (i = 0; i < VEER_SNAT_TRIES; i++) {
		/* First the client's own port, as conntrack's NAT does: the client
		 * reuses it only when its TCP allows, so the backend's TIME_WAIT
		 * socket of that port accepts the new SYN. Then random ports. */
		if (i == 0 && keep && bpf_ntohs(p->t.sport) >= 1024)
			w->fwd.sport = p->t.sport;
		else
			w->fwd.sport = bpf_htons(VEER_SNAT_PORT_MIN +
						 (hash + i * 7919) % VEER_SNAT_PORT_RANGE);
		w->reply.dport = w->fwd.sport;
		if (veer_port_owned(skb, w))
			continue; /* the node's own */
		/* Look before inserting: the client's own port is usually still
		 * held by its previous connection, and a failed insert into an LRU
		 * map costs as much as a successful one. */
		held = veer_nat_rev.lookup(&w->reply);
		if (!held) {
			if (veer_nat_rev.insert(&w->reply, &w->rev) == 0)
				return 0;
			held = veer_nat_rev.lookup(&w->reply); /* taken meanwhile */
		}
		/* Taken: by a flow that has ended, or by this very client port's
		 * previous connection to this frontend (the client reuses its
		 * port for the same destination only when its TCP allows it)? Then
		 * it is free. The same client port may well be connected to
		 * another frontend of the same backend meanwhile: that flow lives. */
		if (held && (veer_flow_stale(&w->reply, held, 1, w->fwd.last_seen_ns) ||
			     (held->dport == p->t.sport && veer_same_addr(held->daddr, p->t.saddr) &&
			      held->sport == p->t.dport && veer_same_addr(held->saddr, p->t.daddr))) &&
		    veer_nat_rev.update(&w->reply, &w->rev) == 0)
			return 0;
	}
	return -1;
}

/* Source-NAT a new flow to this node's address: fills w->fwd's source and
 * w->reply's destination, and reserves the port (veer_snat_port); -1 when
 * there is no node address of the family or no port. */
static __always_inline int veer_snat(struct __sk_buff *skb, const struct veer_pkt *p,
				     struct veer_flow_scratch *w)
{
	struct veer_node_value *node;
	__u32 zero = 0, snat[4];

	node = veer_node.lookup(&zero);
	if (!node)
		return -1;
	if (p->t.family == VEER_FAMILY_IPV4)
		__builtin_memcpy(snat, node->addr4, 16);
	else
		__builtin_memcpy(snat, node->addr6, 16);
	if (!(snat[0] | snat[1] | snat[2] | snat[3]))
		return -1; /* no node address of this family */
	__builtin_memcpy(w->fwd.saddr, snat, 16);
	__builtin_memcpy(w->reply.daddr, snat, 16);
	return veer_snat_port(skb, p, w, 1);
}

/* The first packet of a flow to an external frontend. */
static __always_inline int veer_new_flow(struct __sk_buff *skb, const struct veer_pkt *p)
{
	struct veer_service_key key = {};
	struct veer_service_value *frontend, *slot;
	struct veer_backend_key backend_key = {};
	struct veer_backend_value *backend;
	struct veer_flow_scratch *w;
	struct bpf_fib_lookup fib;
	struct veer_ext_affinity_key affinity_key = {};
	__u32 zero = 0;
	__u16 count;
	__u8 report_flags = 0;
	int stored = 0, short_circuit = 0, route, dsr = 0;
	__u32 carry = VEER_NODEPORT_DSR ? veer_dsr_len(p->t.family) : 0;
	__u32 iif = p->iif;

	__builtin_memcpy(key.addr, p->t.daddr, 16);
	key.port = p->t.dport;
	key.proto = p->t.proto;
	key.family = p->t.family;
	key.scope = VEER_SCOPE_EXTERNAL;
	frontend = veer_services.lookup(&key);
	if (!frontend) {
		/* Not ours. */
		if (p->syn)
			veer_forget_reverse(p);
		return TC_ACT_OK;
	}
	if ((frontend->flags & VEER_SVC_F_SOURCE_RANGES) &&
	    !veer_source_allowed(frontend->service_id, &p->t)) {
		veer_count(VEER_CNT_NAT_DENIED_SOURCE);
		veer_report_tc(skb, VEER_CNT_NAT_DENIED_SOURCE, p, frontend->service_id, NULL, 0, 0);
		return TC_ACT_SHOT;
	}
	if ((frontend->flags & VEER_SVC_F_ACCESS) && !veer_tc_access(skb, p, frontend))
		return TC_ACT_SHOT;
	if ((frontend->flags & VEER_SVC_F_EXT_LOCAL) && veer_from_pod(&p->t)) {
		/* A pod elsewhere in the cluster: serve it from every endpoint,
		 * source-NATed like kube-proxy's short-circuit. */
		key.scope = VEER_SCOPE_SOCKET;
		frontend = veer_services.lookup(&key);
		if (!frontend) {
			veer_count(VEER_CNT_INCONSISTENT);
			veer_report_tc(skb, VEER_CNT_INCONSISTENT, p, 0, NULL, 0,
				       VEER_EV_F_SHORT_CIRCUIT);
			return TC_ACT_SHOT;
		}
		short_circuit = 1;
		report_flags |= VEER_EV_F_SHORT_CIRCUIT;
		veer_count(VEER_CNT_NAT_SHORT_CIRCUIT);
	}
	count = frontend->count;
	if (count == 0) {
		if (!(frontend->flags & VEER_SVC_F_DROP_EMPTY)) {
			/* No endpoint anywhere: kube-proxy REJECTs. */
			veer_count(VEER_CNT_NAT_REJECT);
			veer_report_tc(skb, VEER_CNT_NAT_REJECT, p, frontend->service_id, NULL, 0,
				       report_flags);
			return VEER_TC_REJECT;
		}
		veer_count(VEER_CNT_NAT_DROP);
		veer_report_tc(skb, VEER_CNT_NAT_DROP, p, frontend->service_id, NULL, 0, report_flags);
		return TC_ACT_SHOT;
	}
	if (frontend->flags & VEER_SVC_F_AFFINITY) {
		__builtin_memcpy(affinity_key.addr, p->t.saddr, 16);
		affinity_key.family = p->t.family;
		affinity_key.service_id = frontend->service_id;
		backend_key.backend_id =
			veer_ext_affinity_lookup(&affinity_key, frontend->affinity_timeout);
		if (backend_key.backend_id)
			report_flags |= VEER_EV_F_AFFINITY;
	}
	if (!backend_key.backend_id) {
		slot = veer_pick(&key, count, frontend->flags, frontend->service_id,
				 veer_flow_hash(p->t.saddr, p->t.sport, p->t.proto));
		if (!slot) {
			veer_count(VEER_CNT_INCONSISTENT);
			veer_report_tc(skb, VEER_CNT_INCONSISTENT, p, frontend->service_id, NULL, 0,
				       report_flags);
			return TC_ACT_SHOT;
		}
		backend_key.backend_id = slot->backend_id;
	}
	if (frontend->flags & VEER_SVC_F_AFFINITY) {
		struct veer_affinity_value fresh = {
			.backend_id = backend_key.backend_id,
			.last_used_ns = bpf_ktime_get_ns(),
		};
		veer_ext_affinity.update(&affinity_key, &fresh);
	}
	backend = veer_backends.lookup(&backend_key);
	if (!backend || backend->family != p->t.family) {
		veer_count(VEER_CNT_INCONSISTENT);
		veer_report_tc(skb, VEER_CNT_INCONSISTENT, p, frontend->service_id, NULL, 0,
			       report_flags);
		return TC_ACT_SHOT;
	}

	w = veer_flow_scratch.lookup(&zero);
	if (!w) {
		veer_count(VEER_CNT_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	__builtin_memset(w, 0, sizeof(*w));

	/* Forward: client -> backend, possibly from the node instead. */
	__builtin_memcpy(w->fwd.saddr, p->t.saddr, 16);
	w->fwd.sport = p->t.sport;
	__builtin_memcpy(w->fwd.daddr, backend->addr, 16);
	w->fwd.dport = backend->port;
	w->fwd.service_id = frontend->service_id;
	w->fwd.last_seen_ns = bpf_ktime_get_ns();

	/* Reply: backend -> (client or node) becomes frontend -> client. */
	__builtin_memcpy(w->rev.saddr, p->t.daddr, 16);
	w->rev.sport = p->t.dport;
	__builtin_memcpy(w->rev.daddr, p->t.saddr, 16);
	w->rev.dport = p->t.sport;
	w->rev.service_id = frontend->service_id;
	w->rev.last_seen_ns = w->fwd.last_seen_ns;
	__builtin_memcpy(w->reply.saddr, backend->addr, 16);
	w->reply.sport = backend->port;
	w->reply.proto = p->t.proto;
	w->reply.family = p->t.family;

	/* In DSR mode, ask too whether the packet has room for the frontend. */
	route = veer_route(skb, iif, p->t.family, w->fwd.saddr, w->fwd.daddr, &fib, carry);
	if (route == VEER_ROUTE_TOO_BIG) {
		carry = 0;
		route = veer_route(skb, iif, p->t.family, w->fwd.saddr, w->fwd.daddr, &fib, 0);
	}
	if (route < 0 && route != VEER_ROUTE_LOCAL) {
		veer_count(VEER_CNT_NAT_FAIL);
		veer_nat_failed(skb, p, frontend->service_id, backend, report_flags);
		return TC_ACT_SHOT;
	}
	/* A backend at this node's own address (host network) is local: its
	 * replies leave by this node's devices, where egress restores them. */
	if (route != VEER_ROUTE_LOCAL &&
	    (fib.ifindex == iif || veer_via_gateway(&fib, p->t.family, backend->addr)) &&
	    (short_circuit || !(frontend->flags & VEER_SVC_F_EXT_LOCAL))) {
		/* The backend is on another node: behind the device the packet
		 * came in on, or through a gateway (an overlay's tunnel, another
		 * link). Either it answers the client itself (DSR: it learns the
		 * frontend from this packet), or its reply must come back through
		 * us, so SNAT. */
		/* DSR only on the device the packet came by: the backend's node
		 * reads the frontend where its TC programs are (a tunnel's far
		 * end has none). */
		if (carry && !short_circuit && fib.ifindex == iif && veer_dsr_allowed(p, &fib)) {
			w->fwd.last_seen_ns |= VEER_NAT_DSR;
			dsr = 1;
		} else if (veer_snat(skb, p, w) < 0) {
			veer_count(VEER_CNT_NAT_FAIL);
			veer_nat_failed(skb, p, frontend->service_id, backend, report_flags);
			return TC_ACT_SHOT;
		} else {
			stored = 1;
			veer_count(VEER_CNT_NAT_SNAT);
		}
	} else {
		__builtin_memcpy(w->reply.daddr, p->t.saddr, 16);
		w->reply.dport = p->t.sport;
		if (veer_nat_rev.update(&w->reply, &w->rev) != 0) {
			veer_count(VEER_CNT_NAT_FAIL);
			veer_nat_failed(skb, p, frontend->service_id, backend, report_flags);
			return TC_ACT_SHOT;
		}
	}
	if (veer_nat_fwd.update((struct veer_tuple *)&p->t, &w->fwd) != 0) {
		veer_count(VEER_CNT_NAT_FAIL);
		veer_nat_failed(skb, p, frontend->service_id, backend, report_flags);
		return TC_ACT_SHOT;
	}
	veer_count(VEER_CNT_NAT_NEW);
	/* LeastConnections counts the flows it places (until their FIN or RST,
	 * or the agent's sweep); a new flow of another algorithm that reuses a
	 * counted flow's tuple ends that one's count. A FIN or RST that finds
	 * no entry (its flow's entry was evicted) ends at once: not counted. */
	if ((frontend->flags & VEER_SVC_ALG_MASK) == (VEER_ALG_LEAST_CONN << VEER_SVC_ALG_SHIFT) &&
	    !p->fin)
		veer_lc_flow_hold(&p->t, backend_key.backend_id);
	else
		veer_lc_flow_release(&p->t);
	if (stored)
		report_flags |= VEER_EV_F_SNAT;
	if (dsr) {
		report_flags |= VEER_EV_F_DSR;
		veer_count(VEER_CNT_NAT_DSR);
	}
	veer_report_tc(skb, VEER_CNT_NAT_NEW, p, frontend->service_id, backend->addr,
		       backend->port, report_flags);
	veer_rewrite(skb, p, &w->fwd);
	if (route == VEER_ROUTE_LOCAL)
		return TC_ACT_OK; /* up this node's stack to the host-network backend */
	if (dsr && veer_dsr_push(skb, p) < 0) {
		veer_count(VEER_CNT_NAT_FAIL);
		veer_nat_failed(skb, p, frontend->service_id, backend, report_flags);
		return TC_ACT_SHOT;
	}
	return veer_send(skb, route, &fib);
}

int veer_tc_ingress(struct __sk_buff *skb)
{
	struct veer_pkt p;
	int verdict;
	struct veer_nat_value *nat;
	__u64 now = 0;
	__u32 flags;

	verdict = veer_parse(skb, &p);
	if (verdict) {
		/* Perhaps a DSR flow's first packet: a program of its own. */
		if (VEER_NODEPORT_DSR && verdict == VEER_PARSE_OPTIONS)
			veer_tc_tail.call(skb, VEER_TAIL_DSR);
		return TC_ACT_OK;
	}
	/* One lookup in a small map says what the destination can be. Pod to
	 * pod traffic and the replies of the socket path, most of what crosses
	 * a node, are for none of these and end here. */
	flags = veer_tc_addr_flags(p.t.daddr, p.t.family);
	/* Replies that come in through a device are those of flows veer
	 * source-NATed (a local backend's replies to an un-SNATed flow leave by
	 * veer_tc_egress), so they are addressed to a SNAT address. */
	if (flags & VEER_TC_ADDR_SNAT) {
		nat = veer_nat_rev.lookup(&p.t);
		if (nat) {
			now = bpf_ktime_get_ns();
			if (!veer_flow_stale(&p.t, nat, 1, now)) {
				veer_count(VEER_CNT_NAT_REPLY);
				return veer_apply(skb, &p, nat, 1, now);
			}
			veer_nat_rev.delete(&p.t);
		}
	}
	if (!(flags & VEER_TC_ADDR_FRONTEND)) {
		/* Every reply entry comes from a backend (its key's source), so
		 * only a SYN to one can find an old entry to forget. */
		if (p.syn && (flags & VEER_TC_ADDR_BACKEND))
			veer_forget_reverse(&p);
		return TC_ACT_OK;
	}
	/* A SYN starts a new connection even if an old one used the same ports:
	 * choose afresh (the new entry replaces the stale one), as conntrack
	 * does for a connection in TIME_WAIT, unless the entry is only a moment
	 * old and not closing, i.e. this is a retransmitted SYN of the same
	 * connection. */
	nat = veer_nat_fwd.lookup(&p.t);
	if (nat) {
		if (!now)
			now = bpf_ktime_get_ns();
		if (!veer_flow_stale(&p.t, nat, 0, now) &&
		    (!p.syn || (!(nat->last_seen_ns & VEER_NAT_CLOSING) &&
				veer_nat_age(nat, now) < VEER_SYN_REUSE_NS)))
			return veer_apply(skb, &p, nat, 0, now);
	}
	verdict = veer_new_flow(skb, &p);
	if (verdict == VEER_TC_REJECT) {
		/* Building the ICMP answer does not fit in this program's 512-byte
		 * stack beside veer_new_flow: it is a program of its own. */
		veer_tc_tail.call(skb, VEER_TAIL_REJECT);
		veer_count(VEER_CNT_NAT_FAIL); /* the tail call is missing */
		return TC_ACT_SHOT;
	}
	return verdict;
}

/* Tail-called by veer_tc_ingress for a packet to refuse (VEER_TAIL_REJECT). */
int veer_tc_reject(struct __sk_buff *skb)
{
	struct veer_pkt p;

	if (veer_parse(skb, &p) != 0)
		return TC_ACT_SHOT;
	return veer_reject(skb, &p);
}

/* A DSR flow's packet as it reaches the backend's node: the packet (client ->
 * backend) and the frontend its carrier names. */
struct veer_dsr_pkt {
	struct veer_pkt p;
	__u8 frontend[16];
	__be16 frontend_port;
	__u16 carrier; /* bytes of the carrier: sizeof(struct veer_dsr_opt4/6) */
	__u8 l4_proto;
};

/* Parse a packet that carries veer's DSR option (IPv4) or destination
 * options header (IPv6), exactly as veer_dsr_push() writes them. -1 for any
 * other header with options: not ours. */
static __always_inline int veer_parse_dsr(struct __sk_buff *skb, struct veer_dsr_pkt *d)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memset(d, 0, sizeof(*d));
	d->p.iif = skb->ingress_ifindex;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct veer_dsr_opt4 *opt = (void *)(ip + 1);

		if ((void *)(opt + 1) > end || ip->ihl != 7)
			return -1;
		if (ip->frag_off & bpf_htons(0x3fff))
			return -1;
		if (opt->type != VEER_DSR_OPT4_TYPE || opt->len != sizeof(*opt))
			return -1;
		__builtin_memcpy(d->frontend, opt->addr, 4);
		d->frontend_port = opt->port;
		d->carrier = sizeof(*opt);
		__builtin_memcpy(d->p.t.saddr, &ip->saddr, 4);
		__builtin_memcpy(d->p.t.daddr, &ip->daddr, 4);
		d->p.t.family = VEER_FAMILY_IPV4;
		d->p.l4_off = ETH_HLEN + sizeof(*ip) + sizeof(*opt);
		d->l4_proto = ip->protocol;
		return veer_parse_l4(&d->p, opt + 1, end, ip->protocol);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct veer_dsr_opt6 *opt = (void *)(ip6 + 1);

		if ((void *)(opt + 1) > end || ip6->nexthdr != VEER_IPPROTO_DSTOPTS)
			return -1;
		if (opt->hdrlen != sizeof(*opt) / 8 - 1 || opt->type != VEER_DSR_OPT6_TYPE ||
		    opt->len != 18 || opt->pad_type != 1 || opt->pad_len != 0)
			return -1;
		__builtin_memcpy(d->frontend, opt->addr, 16);
		d->frontend_port = opt->port;
		d->carrier = sizeof(*opt);
		__builtin_memcpy(d->p.t.saddr, &ip6->saddr, 16);
		__builtin_memcpy(d->p.t.daddr, &ip6->daddr, 16);
		d->p.t.family = VEER_FAMILY_IPV6;
		d->p.l4_off = ETH_HLEN + sizeof(*ip6) + sizeof(*opt);
		d->l4_proto = opt->nexthdr;
		return veer_parse_l4(&d->p, opt + 1, end, opt->nexthdr);
	}
	return -1;
}

/* Remove the DSR carrier veer_parse_dsr() found, leaving the packet as the
 * client sent it but for its destination (the backend). 0, or -1. */
static __always_inline int veer_dsr_pop(struct __sk_buff *skb, const struct veer_dsr_pkt *d)
{
	if (d->p.t.family == VEER_FAMILY_IPV4) {
		struct {
			__be32 w0; /* version+ihl, tos, tot_len */
			struct veer_dsr_opt4 opt;
		} old;
		__be32 w0;
		__be16 check;
		__s64 diff;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &old.w0, 4) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &old.opt,
				       sizeof(old.opt)) < 0 ||
		    bpf_skb_load_bytes(skb, VEER_IP_CSUM_OFF, &check, 2) < 0)
			return -1;
		w0 = old.w0;
		((__u8 *)&w0)[0] = 0x45; /* version 4, 5 words of header */
		((__be16 *)&w0)[1] =
			bpf_htons(bpf_ntohs(((__be16 *)&old.w0)[1]) - sizeof(struct veer_dsr_opt4));
		diff = bpf_csum_diff((__be32 *)&old, sizeof(old), &w0, 4, 0);
		check = veer_csum_update(check, diff);
		if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct veer_dsr_opt4),
					BPF_ADJ_ROOM_NET, 0))
			return -1;
		bpf_skb_store_bytes(skb, ETH_HLEN, &w0, 4, BPF_F_RECOMPUTE_CSUM);
		bpf_skb_store_bytes(skb, VEER_IP_CSUM_OFF, &check, 2, BPF_F_RECOMPUTE_CSUM);
		return 0;
	} else {
		__u8 hdr[3]; /* payload_len, nexthdr */
		__u16 len;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + 4, hdr, 2) < 0)
			return -1;
		len = ((__u16)hdr[0] << 8 | hdr[1]) - sizeof(struct veer_dsr_opt6);
		hdr[0] = len >> 8;
		hdr[1] = len & 0xff;
		hdr[2] = d->l4_proto;
		if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct veer_dsr_opt6),
					BPF_ADJ_ROOM_NET, 0))
			return -1;
		bpf_skb_store_bytes(skb, ETH_HLEN + 4, hdr, 3, BPF_F_RECOMPUTE_CSUM);
		return 0;
	}
}

/* Tail-called by veer_tc_ingress (DSR mode) for a packet with IPv4 options or
 * an IPv6 destination options header (VEER_TAIL_DSR). When it carries veer's
 * DSR option, this node holds the flow's backend: record where its replies
 * must appear to come from, (backend -> client) -> (frontend -> client), for
 * veer_tc_egress, remove the option and let the packet go on to the pod.
 *
 * The replies must leave by this device, where veer_tc_egress restores them:
 * a client that this node reaches another way (itself, one of its pods: the
 * ingress node avoids those) cannot be served by DSR; its packet is dropped
 * and counted (nat_fail). */
int veer_tc_dsr(struct __sk_buff *skb)
{
	struct veer_dsr_pkt d;
	struct veer_tuple reply = {};
	struct veer_nat_value rev = {}, *held;
	struct bpf_fib_lookup fib;
	__u64 now;

	if (veer_parse_dsr(skb, &d) < 0)
		return TC_ACT_OK;
	/* Only for a backend of an external frontend: the option is no more
	 * than a claim of whoever sent the packet, and must not let a sender
	 * write reply translations for any address this node routes to. */
	if (!(veer_tc_addr_flags(d.p.t.daddr, d.p.t.family) & VEER_TC_ADDR_BACKEND))
		return TC_ACT_OK;
	if (veer_route(skb, d.p.iif, d.p.t.family, d.p.t.daddr, d.p.t.saddr, &fib, 0) < 0 ||
	    fib.ifindex != d.p.iif) {
		veer_count(VEER_CNT_NAT_FAIL);
		veer_report_tc(skb, VEER_CNT_NAT_FAIL, &d.p, 0, d.p.t.daddr, d.p.t.dport,
			       VEER_EV_F_DSR);
		return TC_ACT_SHOT;
	}
	now = bpf_ktime_get_ns();
	__builtin_memcpy(reply.saddr, d.p.t.daddr, 16);
	__builtin_memcpy(reply.daddr, d.p.t.saddr, 16);
	reply.sport = d.p.t.dport;
	reply.dport = d.p.t.sport;
	reply.proto = d.p.t.proto;
	reply.family = d.p.t.family;
	held = veer_nat_rev.lookup(&reply);
	if (held && !(held->last_seen_ns & VEER_NAT_CLOSING) &&
	    held->sport == d.frontend_port && veer_same_addr(held->saddr, d.frontend)) {
		/* The flow's entry already: a retransmitted SYN, a later datagram. */
		held->last_seen_ns = now | (held->last_seen_ns & VEER_NAT_FLAGS);
	} else {
		__builtin_memcpy(rev.saddr, d.frontend, 16);
		rev.sport = d.frontend_port;
		__builtin_memcpy(rev.daddr, d.p.t.saddr, 16);
		rev.dport = d.p.t.sport;
		rev.last_seen_ns = now;
		if (veer_nat_rev.update(&reply, &rev) != 0) {
			veer_count(VEER_CNT_NAT_FAIL);
			veer_report_tc(skb, VEER_CNT_NAT_FAIL, &d.p, 0, d.p.t.daddr, d.p.t.dport,
				       VEER_EV_F_DSR);
			return TC_ACT_SHOT;
		}
		veer_count(VEER_CNT_NAT_DSR_IN);
	}
	if (veer_dsr_pop(skb, &d) < 0) {
		veer_count(VEER_CNT_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* A flow whose ports the node's own connection takes after all: both of its
 * entries go (and its LeastConnections count), so that neither its replies
 * nor its packets mix with the node's. `reply`: its reverse entry's key;
 * `held`: that entry. */
static __always_inline void veer_forget_flow(struct veer_tuple *reply,
					     const struct veer_nat_value *held)
{
	struct veer_tuple fwd = {};

	veer_nat_other_key(held, reply->proto, reply->family, &fwd);
	veer_lc_flow_release(&fwd);
	veer_nat_fwd.delete(&fwd);
	veer_nat_rev.delete(reply);
}

/* The node's own packet `p`, leaving from one of its SNAT addresses.
 *
 * The node's own connections share those addresses with the flows veer
 * source-NATs to them, and the kernel that picks their source ports knows
 * only its own sockets (veer_snat_port avoids those): it may pick a port that
 * a live source-NATed flow holds toward the very same backend. The backend
 * would see one tuple for two connections, and the flow's reply entry would
 * take the node's replies. Conntrack, which kube-proxy's SNAT relies on,
 * resolves such a clash by moving the new connection to another source port;
 * so does this, with a NAT entry pair of its own (service 0): the forward
 * entry, keyed by the node's tuple, rewrites its packets here, and the
 * reverse entry restores the replies in veer_tc_ingress, which hands them to
 * this node's stack. A clash with a flow that has ended only forgets that
 * flow's reply entry.
 *
 * Returns 1 when the packet was translated. Only a TCP SYN or a UDP datagram
 * without an entry can start a clash. */
static __always_inline int veer_host_flow(struct __sk_buff *skb, const struct veer_pkt *p)
{
	struct veer_nat_value *nat, *held;
	struct veer_flow_scratch *w;
	struct veer_tuple reply = {};
	__u32 zero = 0;
	__u64 now;

	/* Only a connection to a backend can clash (a reverse entry's source
	 * is one, flagged while any entry names it), and only one moved before
	 * has an entry: the rest of what the node sends (to the API server, an
	 * overlay's tunnel, ...) costs this one lookup in a small map. */
	if (!(veer_tc_addr_flags(p->t.daddr, p->t.family) & VEER_TC_ADDR_BACKEND))
		return 0;
	nat = veer_nat_fwd.lookup((struct veer_tuple *)&p->t);
	if (nat && nat->service_id)
		nat = NULL; /* not a moved connection's (service 0) */
	if (!nat && !p->syn && !p->udp)
		return 0;
	now = bpf_ktime_get_ns();
	if (nat) {
		/* A moved connection, or (a SYN) a new one on the same ports. The
		 * node reuses its own tuple only once the connection closed (its
		 * socket's TIME_WAIT): a SYN on an entry not closing is a
		 * retransmission, however late. */
		if (!veer_flow_stale(&p->t, nat, 0, now) &&
		    (!p->syn || !(nat->last_seen_ns & VEER_NAT_CLOSING))) {
			veer_nat_seen(nat, p, 0, now);
			veer_rewrite(skb, p, nat);
			return 1;
		}
		/* Over: a new connection is judged afresh below; a late packet
		 * of the old one leaves as it is. */
		veer_nat_fwd.delete((struct veer_tuple *)&p->t);
		if (!p->syn && !p->udp)
			return 0;
	}
	veer_reply_tuple(&p->t, &reply);
	held = veer_nat_rev.lookup(&reply);
	if (!held)
		return 0; /* no clash: the common case */
	if (veer_flow_stale(&reply, held, 1, now)) {
		veer_nat_rev.delete(&reply);
		return 0;
	}
	w = veer_flow_scratch.lookup(&zero);
	if (!w)
		return 0;
	__builtin_memset(w, 0, sizeof(*w));
	__builtin_memcpy(w->fwd.saddr, p->t.saddr, 16);
	__builtin_memcpy(w->fwd.daddr, p->t.daddr, 16);
	w->fwd.dport = p->t.dport;
	w->fwd.last_seen_ns = now;
	__builtin_memcpy(w->rev.saddr, p->t.daddr, 16);
	w->rev.sport = p->t.dport;
	__builtin_memcpy(w->rev.daddr, p->t.saddr, 16);
	w->rev.dport = p->t.sport;
	w->rev.last_seen_ns = now;
	__builtin_memcpy(&w->reply, &reply, sizeof(reply));
	if (veer_snat_port(skb, p, w, 0) < 0) {
		/* No port: the node's connection wins, as it did before moves,
		 * and the flow that held the port ends. */
		veer_count(VEER_CNT_NAT_FAIL);
		veer_forget_flow(&reply, held);
		return 0;
	}
	if (veer_nat_fwd.update((struct veer_tuple *)&p->t, &w->fwd) != 0) {
		veer_count(VEER_CNT_NAT_FAIL);
		veer_nat_rev.delete(&w->reply);
		veer_forget_flow(&reply, held);
		return 0;
	}
	veer_count(VEER_CNT_NAT_HOST_MOVED);
	veer_rewrite(skb, p, &w->fwd);
	return 1;
}

int veer_tc_egress(struct __sk_buff *skb)
{
	struct veer_pkt p;
	struct veer_nat_value *nat;
	__u32 flags;
	__u64 now = 0;

	/* Only replies of local backends are restored here, and the node's own
	 * moved connections translated; they come from a pod's device or the
	 * node itself. A packet that came in through this very device is
	 * passing through (veer's own translations leave this way, already
	 * translated): nothing to look up. */
	if (skb->ingress_ifindex == skb->ifindex)
		return TC_ACT_OK;
	if (veer_parse(skb, &p) != 0)
		return TC_ACT_OK;
	flags = veer_tc_addr_flags(p.t.saddr, p.t.family);
	/* A reply comes from a backend: most of what pods send does not. It is
	 * looked for first: a host-network backend's reply leaves from the
	 * node's own address, and is not the node's own flow. */
	nat = NULL;
	if (flags & VEER_TC_ADDR_BACKEND) {
		nat = veer_nat_rev.lookup(&p.t);
		if (nat) {
			now = bpf_ktime_get_ns();
			if (veer_flow_stale(&p.t, nat, 1, now)) {
				veer_nat_rev.delete(&p.t);
				nat = NULL;
			}
		}
	}
	if (!nat) {
		/* The node's own packet (no ingress device: made here) from a
		 * SNAT address: perhaps a connection on ports a source-NATed
		 * flow holds. */
		if (!p.iif && (flags & VEER_TC_ADDR_SNAT))
			veer_host_flow(skb, &p);
		return TC_ACT_OK;
	}
	veer_count(VEER_CNT_NAT_REPLY);
	veer_nat_seen(nat, &p, 1, now);
	veer_rewrite(skb, &p, nat);
	return TC_ACT_OK;
}
