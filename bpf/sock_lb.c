/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level load balancing: cgroup sock_addr programs that rewrite a
 * connect() or sendmsg() to a Service address into one to a backend, before
 * any packet exists, and translate the backend's address back into the
 * Service's for getpeername() and recvmsg().
 *
 * Because the rewrite happens once per connection (per datagram for
 * unconnected UDP), there is no conntrack and no per-packet NAT on this
 * path; an established connection keeps its backend however the maps change.
 *
 * Return values follow the sock_addr contract: 1 lets the call proceed
 * (possibly rewritten); 0 fails it. We set the error to ECONNREFUSED before
 * failing so that applications see what kube-proxy's REJECT gives them,
 * instead of the default EPERM.
 *
 * Every verdict but a pass is reported to the agent through veer_report()
 * (veer_helpers.c): refusals always, translations while the agent asks. A
 * socket hook runs before the source address is bound, so its events carry
 * the socket cookie and the calling process instead of a source address.
 */
#include "veer_common.h"

#define VEER_ECONNREFUSED 111
#define VEER_EHOSTUNREACH 113

/* A destination as a socket hook sees it, normalized: an IPv4-mapped IPv6
 * address (::ffff:a.b.c.d on a dual-stack socket) is treated as IPv4. */
struct veer_flow {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 family;
	__u8 mapped; /* 1 if it came from an IPv4-mapped IPv6 address */
};

/* Report a socket hook's verdict on `flow` (see veer_report). */
static __always_inline void veer_report_sock(void *ctx, __u8 hook, __u32 reason,
					     const struct veer_flow *flow, __u32 service_id,
					     const struct veer_backend_value *backend,
					     __u8 flags)
{
	if (flow->mapped)
		flags |= VEER_EV_F_MAPPED;
	veer_report(ctx, hook, reason, flags, service_id, flow->family, flow->proto,
		    NULL, 0, flow->addr, flow->port,
		    backend ? backend->addr : NULL, backend ? backend->port : 0);
}

enum veer_verdict {
	VEER_PASS = 0,   /* not a Service address: leave the call alone */
	VEER_TRANSLATE,  /* rewrite the destination to the chosen backend */
	VEER_REFUSE,     /* fail the call with ECONNREFUSED */
	VEER_UNREACHABLE,/* fail the call with EHOSTUNREACH (kube-proxy's DROP) */
};

static __always_inline int veer_proto_handled(__u32 proto)
{
	return proto == VEER_IPPROTO_TCP || proto == VEER_IPPROTO_UDP;
}

/* Decide what to do with a destination that matched no frontend: refuse it
 * if the address is a Service address or lies inside a Service CIDR. */
static __always_inline int veer_miss(void *ctx, __u8 hook, const struct veer_flow *flow)
{
	struct veer_vip_key vip = {};
	struct veer_cidr_key cidr = {};

	__builtin_memcpy(vip.addr, flow->addr, 16);
	vip.family = flow->family;
	if (veer_vips.lookup(&vip)) {
		veer_count(VEER_CNT_REFUSED_UNKNOWN_PORT);
		veer_report_sock(ctx, hook, VEER_CNT_REFUSED_UNKNOWN_PORT, flow, 0, NULL, 0);
		return VEER_REFUSE;
	}
	/* The trie's data is family, padding, address: match all of it. */
	cidr.prefixlen = 32 + 128;
	cidr.family = flow->family;
	__builtin_memcpy(cidr.addr, flow->addr, 16);
	if (veer_service_cidrs.lookup(&cidr)) {
		veer_count(VEER_CNT_REFUSED_NO_SERVICE);
		veer_report_sock(ctx, hook, VEER_CNT_REFUSED_NO_SERVICE, flow, 0, NULL, 0);
		return VEER_REFUSE;
	}
	return VEER_PASS;
}

/* The backend a client's live affinity entry names, or 0. An entry counts
 * while it is younger than the timeout and its backend still serves the
 * frontend (veer_affinity_match); the caller refreshes it on use. */
static __always_inline __u32 veer_affinity_lookup(struct veer_affinity_key *key,
						  __u32 timeout_seconds)
{
	return veer_affinity_backend(veer_affinity.lookup(key), key->service_id, VEER_SCOPE_SOCKET,
				     timeout_seconds);
}

/* Apply a frontend's access rules to the calling socket's network namespace.
 * Returns VEER_PASS when allowed, else VEER_REFUSE (reported). A namespace
 * whose address the agent has not recorded yet is refused: failing closed
 * beats letting a denied client through, and the event makes the agent look
 * at namespaces again at once. */
static __always_inline int veer_sock_access(void *ctx, __u8 hook, const struct veer_flow *flow,
					    __u32 service_id, __u16 flags)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct veer_node_value *addrs = veer_netns_addrs.lookup(&netns);
	const __u8 *client;
	__u32 first;
	__u16 rule = VEER_RULE_DEFAULT;

	if (addrs) {
		client = flow->family == VEER_FAMILY_IPV4 ? addrs->addr4 : addrs->addr6;
		__builtin_memcpy(&first, client, 4);
		if (first != 0 || flow->family == VEER_FAMILY_IPV6) {
			if (veer_access_allowed(service_id, flags, flow->family, client, &rule))
				return VEER_PASS;
			veer_count(VEER_CNT_ACCESS_DENIED);
			veer_report_rule(ctx, hook, VEER_CNT_ACCESS_DENIED,
					 flow->mapped ? VEER_EV_F_MAPPED : 0, service_id,
					 flow->family, flow->proto, client, 0, flow->addr, flow->port,
					 NULL, 0, rule);
			return VEER_REFUSE;
		}
	}
	veer_count(VEER_CNT_ACCESS_UNKNOWN);
	veer_report_sock(ctx, hook, VEER_CNT_ACCESS_UNKNOWN, flow, service_id, NULL, 0);
	return VEER_REFUSE;
}

/* The Maglev hash of a socket's flow: the client's address (its namespace's,
 * or the namespace cookie when unknown) and its bound port; an unbound socket
 * has no port yet, so its cookie stands in and each socket is its own flow. */
static __always_inline __u32 veer_sock_flow_hash(struct bpf_sock_addr *ctx,
						 const struct veer_flow *flow)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct veer_node_value *addrs = veer_netns_addrs.lookup(&netns);
	__u8 client[16] = {};
	__be16 port = 0;
	struct bpf_sock *sk = ctx->sk;

	if (addrs)
		__builtin_memcpy(client, flow->family == VEER_FAMILY_IPV4 ? addrs->addr4 : addrs->addr6,
				 16);
	else
		__builtin_memcpy(client, &netns, 8);
	if (sk)
		port = bpf_htons((__u16)sk->src_port);
	if (!port)
		port = (__be16)veer_socket_cookie(ctx);
	return veer_flow_hash(client, port, flow->proto);
}

/* Take socket `cookie`'s slot of veer_sock_peers and write `peer` into it
 * (see struct veer_sock_peer). 0, or -1 when another connect() is writing
 * the slot at this instant. */
static __always_inline int veer_sock_peer_write(const struct veer_sock_revnat_key *key,
						const struct veer_sock_revnat_value *svc)
{
	__u32 slot = (__u32)key->cookie & (VEER_SOCK_PEERS_MAX - 1);
	struct veer_sock_peer *held = veer_sock_peers.lookup(&slot);
	__u64 was;

	if (!held)
		return -1;
	was = held->key.cookie;
	if (was == VEER_SOCK_PEER_BUSY ||
	    __sync_val_compare_and_swap(&held->key.cookie, was, VEER_SOCK_PEER_BUSY) != was)
		return -1;
	__builtin_memcpy(held->key.addr, key->addr, 16);
	held->key.port = key->port;
	held->key.family = key->family;
	__builtin_memcpy(&held->svc, svc, sizeof(held->svc));
	__sync_lock_test_and_set(&held->key.cookie, key->cookie);
	return 0;
}

/* Read socket `cookie`'s entry of veer_sock_peers into *peer: 1 if there is
 * one, consistent (not being rewritten meanwhile by another socket). */
static __always_inline int veer_sock_peer_read(__u64 cookie, struct veer_sock_peer *peer)
{
	__u32 slot = (__u32)cookie & (VEER_SOCK_PEERS_MAX - 1);
	struct veer_sock_peer *held = veer_sock_peers.lookup(&slot);

	if (!held || held->key.cookie != cookie)
		return 0;
	__builtin_memcpy(peer, held, sizeof(*peer));
	/* A full barrier, then the cookie again: still ours, so the copy is. */
	return __sync_val_compare_and_swap(&held->key.cookie, cookie, cookie) == cookie;
}

/* Remember, for this socket, that its peer `backend` stands for the Service
 * address `flow`: in veer_sock_peers for a TCP connect(), else (or when its
 * slot is being written by another socket) in veer_sock_revnat under the
 * socket's cookie and the backend: a UDP socket may talk to many Services. */
static __always_inline void veer_remember_peer(struct bpf_sock_addr *ctx, __u8 hook,
					       const struct veer_flow *flow,
					       const struct veer_backend_value *backend,
					       __u32 service_id)
{
	struct veer_sock_revnat_key rev_key = {};
	struct veer_sock_revnat_value rev_val = {};

	rev_key.cookie = veer_socket_cookie(ctx);
	__builtin_memcpy(rev_key.addr, backend->addr, 16);
	rev_key.port = backend->port;
	rev_key.family = backend->family;
	__builtin_memcpy(rev_val.addr, flow->addr, 16);
	rev_val.port = flow->port;
	rev_val.service_id = service_id;
	if (flow->proto == VEER_IPPROTO_TCP &&
	    (hook == VEER_HOOK_CONNECT4 || hook == VEER_HOOK_CONNECT6) &&
	    veer_sock_peer_write(&rev_key, &rev_val) == 0)
		return;
	veer_sock_revnat.update(&rev_key, &rev_val);
}

/* Whether the caller is the node-local proxy (never redirected). */
static __always_inline int veer_caller_is_proxy(void)
{
	__u32 zero = 0;
	struct veer_proxy_value *proxy = veer_proxy.lookup(&zero);

	return proxy && proxy->set && (__u32)bpf_get_current_uid_gid() == proxy->uid;
}

/* Send a connect() to the frontend's node-local proxy instead, remembering
 * the original destination by socket cookie (sockops files it under the
 * client's port once it has one; the proxy's getsockopt(SO_ORIGINAL_DST)
 * finds it there) and, for getpeername(), that the proxy stands for the
 * Service address. Returns VEER_TRANSLATE with *out = the proxy, or
 * VEER_PASS when the frontend has no proxy entry (then it is balanced as
 * usual). */
static __always_inline int veer_redirect(struct bpf_sock_addr *ctx, __u8 hook,
					 const struct veer_flow *flow, __u32 service_id,
					 struct veer_backend_value *out)
{
	struct veer_backend_value *proxy = veer_redirects.lookup(&service_id);
	struct veer_orig_value orig = {};
	__u64 cookie;

	if (!proxy || proxy->family != flow->family)
		return VEER_PASS;
	cookie = veer_socket_cookie(ctx);
	__builtin_memcpy(orig.addr, flow->addr, 16);
	orig.port = flow->port;
	orig.family = flow->family;
	veer_redirect_socks.update(&cookie, &orig);
	__builtin_memcpy(out, proxy, sizeof(*out));
	veer_remember_peer(ctx, hook, flow, proxy, service_id);

	veer_count(VEER_CNT_REDIRECTED);
	veer_report_sock(ctx, hook, VEER_CNT_TRANSLATED, flow, service_id, out, VEER_EV_F_REDIRECT);
	return VEER_TRANSLATE;
}

/* Choose a backend for `flow` and remember, for this socket, which Service
 * address the backend stands for. On VEER_TRANSLATE, *out holds the backend. */
static __always_inline int veer_forward(struct bpf_sock_addr *ctx, __u8 hook,
					const struct veer_flow *flow,
					struct veer_backend_value *out)
{
	struct veer_service_key key = {};
	struct veer_service_value *frontend, *slot;
	struct veer_backend_key backend_key = {};
	struct veer_backend_value *backend;
	struct veer_affinity_key affinity_key = {};
	__u32 service_id, affinity_timeout;
	__u16 count, flags;
	__u8 report_flags = 0;

	__builtin_memcpy(key.addr, flow->addr, 16);
	key.port = flow->port;
	key.proto = flow->proto;
	key.family = flow->family;
	frontend = veer_services.lookup(&key);
	if (!frontend)
		return veer_miss(ctx, hook, flow);

	/* Read the count once: the agent may change it under us, but every
	 * slot up to any count it ever published is filled (see veer_structs.h). */
	count = frontend->count;
	flags = frontend->flags;
	service_id = frontend->service_id;
	affinity_timeout = frontend->affinity_timeout;
	if (flags & VEER_SVC_F_ACCESS) {
		int denied = veer_sock_access(ctx, hook, flow, service_id, flags);

		if (denied != VEER_PASS)
			return denied;
	}
	if ((flags & VEER_SVC_F_PASS) && !veer_caller_is_proxy()) {
		/* Redirect by TPROXY: the packets go out addressed to the Service,
		 * for the node's nftables to hand to the proxy. */
		veer_count(VEER_CNT_REDIRECTED);
		return VEER_PASS;
	}
	if ((flags & VEER_SVC_F_REDIRECT) &&
	    (hook == VEER_HOOK_CONNECT4 || hook == VEER_HOOK_CONNECT6) &&
	    !veer_caller_is_proxy() && veer_redirect(ctx, hook, flow, service_id, out) != VEER_PASS)
		return VEER_TRANSLATE;
	if (count == 0) {
		if (flags & VEER_SVC_F_DROP_EMPTY) {
			veer_count(VEER_CNT_DROPPED_NO_LOCAL);
			veer_report_sock(ctx, hook, VEER_CNT_DROPPED_NO_LOCAL, flow, service_id,
					 NULL, 0);
			return VEER_UNREACHABLE;
		}
		veer_count(VEER_CNT_REFUSED_NO_BACKEND);
		veer_report_sock(ctx, hook, VEER_CNT_REFUSED_NO_BACKEND, flow, service_id, NULL, 0);
		return VEER_REFUSE;
	}

	if (flags & VEER_SVC_F_AFFINITY) {
		affinity_key.client = bpf_get_netns_cookie(ctx);
		affinity_key.service_id = service_id;
		backend_key.backend_id = veer_affinity_lookup(&affinity_key, affinity_timeout);
		if (backend_key.backend_id)
			report_flags |= VEER_EV_F_AFFINITY;
	}
	if (!backend_key.backend_id) {
		__u32 hash = 0;

		if ((flags & VEER_SVC_ALG_MASK) == (VEER_ALG_MAGLEV << VEER_SVC_ALG_SHIFT))
			hash = veer_sock_flow_hash(ctx, flow);
		slot = veer_pick(&key, count, flags, service_id, hash);
		if (!slot) {
			veer_count(VEER_CNT_INCONSISTENT);
			veer_report_sock(ctx, hook, VEER_CNT_INCONSISTENT, flow, service_id, NULL, 0);
			return VEER_REFUSE;
		}
		backend_key.backend_id = slot->backend_id;
	}
	if (flags & VEER_SVC_F_AFFINITY) {
		struct veer_affinity_value fresh = {
			.backend_id = backend_key.backend_id,
			.last_used_ns = bpf_ktime_get_ns(),
		};
		veer_affinity.update(&affinity_key, &fresh);
	}
	backend = veer_backends.lookup(&backend_key);
	if (!backend || backend->family != flow->family) {
		veer_count(VEER_CNT_INCONSISTENT);
		veer_report_sock(ctx, hook, VEER_CNT_INCONSISTENT, flow, service_id, NULL, 0);
		return VEER_REFUSE;
	}
	if ((flags & VEER_SVC_ALG_MASK) == (VEER_ALG_LEAST_CONN << VEER_SVC_ALG_SHIFT) &&
	    (hook == VEER_HOOK_CONNECT4 || hook == VEER_HOOK_CONNECT6))
		veer_lc_hold(ctx, backend_key.backend_id);
	if ((flags & VEER_SVC_F_SOCKMAP) && flow->proto == VEER_IPPROTO_TCP &&
	    (hook == VEER_HOOK_CONNECT4 || hook == VEER_HOOK_CONNECT6))
		veer_accel_mark(ctx);
	__builtin_memcpy(out, backend, sizeof(*out));
	veer_remember_peer(ctx, hook, flow, backend, service_id);

	veer_count(VEER_CNT_TRANSLATED);
	veer_report_sock(ctx, hook, VEER_CNT_TRANSLATED, flow, service_id, out, report_flags);
	return VEER_TRANSLATE;
}

/* Look up the Service address that a backend peer stands for on this socket.
 * Returns 1 and fills *svc when there is one. */
static __always_inline int veer_reverse(void *ctx, const struct veer_flow *peer,
					struct veer_sock_revnat_value *svc)
{
	struct veer_sock_revnat_key rev_key = {};
	struct veer_sock_revnat_value *found;
	struct veer_sock_peer mine;
	__u64 cookie = veer_socket_cookie(ctx);

	if (peer->proto == VEER_IPPROTO_TCP && veer_sock_peer_read(cookie, &mine) &&
	    mine.key.family == peer->family && mine.key.port == peer->port &&
	    veer_same_addr(mine.key.addr, peer->addr)) {
		__builtin_memcpy(svc, &mine.svc, sizeof(*svc));
		veer_count(VEER_CNT_REVNAT);
		return 1;
	}
	/* Not there (a socket connected before veer_sock_peers existed, or whose
	 * slot another socket was writing): the cookie-keyed map may know it. */
	rev_key.cookie = cookie;
	__builtin_memcpy(rev_key.addr, peer->addr, 16);
	rev_key.port = peer->port;
	rev_key.family = peer->family;
	found = veer_sock_revnat.lookup(&rev_key);
	if (!found)
		return 0;
	__builtin_memcpy(svc, found, sizeof(*svc));
	veer_count(VEER_CNT_REVNAT);
	return 1;
}

/* ---- IPv4 ---------------------------------------------------------------- */

static __always_inline void veer_flow4(struct bpf_sock_addr *ctx, struct veer_flow *flow)
{
	__u32 ip = ctx->user_ip4;

	__builtin_memset(flow, 0, sizeof(*flow));
	__builtin_memcpy(flow->addr, &ip, 4);
	flow->port = (__be16)ctx->user_port;
	flow->proto = ctx->protocol;
	flow->family = VEER_FAMILY_IPV4;
}

static __always_inline int veer_translate4(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct veer_flow flow;
	struct veer_backend_value backend;
	__u32 ip;
	int verdict;

	if (!veer_proto_handled(ctx->protocol))
		return 1;
	veer_flow4(ctx, &flow);
	verdict = veer_forward(ctx, hook, &flow, &backend);
	if (verdict == VEER_REFUSE || verdict == VEER_UNREACHABLE) {
		bpf_set_retval(verdict == VEER_REFUSE ? -VEER_ECONNREFUSED : -VEER_EHOSTUNREACH);
		return 0;
	}
	if (verdict == VEER_TRANSLATE) {
		__builtin_memcpy(&ip, backend.addr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = (__u32)backend.port;
	}
	return 1;
}

static __always_inline int veer_untranslate4(struct bpf_sock_addr *ctx)
{
	struct veer_flow peer;
	struct veer_sock_revnat_value svc;
	__u32 ip;

	if (!veer_proto_handled(ctx->protocol))
		return 1;
	veer_flow4(ctx, &peer);
	if (veer_reverse(ctx, &peer, &svc)) {
		__builtin_memcpy(&ip, svc.addr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = (__u32)svc.port;
	}
	return 1;
}

int veer_connect4(struct bpf_sock_addr *ctx)
{
	return veer_translate4(ctx, VEER_HOOK_CONNECT4);
}

int veer_sendmsg4(struct bpf_sock_addr *ctx)
{
	return veer_translate4(ctx, VEER_HOOK_SENDMSG4);
}

int veer_recvmsg4(struct bpf_sock_addr *ctx)
{
	return veer_untranslate4(ctx);
}

int veer_getpeername4(struct bpf_sock_addr *ctx)
{
	return veer_untranslate4(ctx);
}

/* ---- IPv6 ---------------------------------------------------------------- */

/* The verifier only allows 4-byte loads and stores of user_ip6[], one word
 * at a time; hence the unrolled copies. */
static __always_inline void veer_flow6(struct bpf_sock_addr *ctx, struct veer_flow *flow)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];

	__builtin_memset(flow, 0, sizeof(*flow));
	flow->port = (__be16)ctx->user_port;
	flow->proto = ctx->protocol;
	if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff)) {
		__builtin_memcpy(flow->addr, &w3, 4);
		flow->family = VEER_FAMILY_IPV4;
		flow->mapped = 1;
		return;
	}
	__builtin_memcpy(flow->addr, &w0, 4);
	__builtin_memcpy(flow->addr + 4, &w1, 4);
	__builtin_memcpy(flow->addr + 8, &w2, 4);
	__builtin_memcpy(flow->addr + 12, &w3, 4);
	flow->family = VEER_FAMILY_IPV6;
}

/* Write `addr` (of `family`) into a v6 socket's user_ip6: IPv4 addresses are
 * written back IPv4-mapped. */
static __always_inline void veer_store6(struct bpf_sock_addr *ctx, const __u8 *addr, __u8 family)
{
	__u32 w0, w1, w2, w3;

	if (family == VEER_FAMILY_IPV4) {
		w0 = 0;
		w1 = 0;
		w2 = bpf_htonl(0x0000ffff);
		__builtin_memcpy(&w3, addr, 4);
	} else {
		__builtin_memcpy(&w0, addr, 4);
		__builtin_memcpy(&w1, addr + 4, 4);
		__builtin_memcpy(&w2, addr + 8, 4);
		__builtin_memcpy(&w3, addr + 12, 4);
	}
	ctx->user_ip6[0] = w0;
	ctx->user_ip6[1] = w1;
	ctx->user_ip6[2] = w2;
	ctx->user_ip6[3] = w3;
}

static __always_inline int veer_translate6(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct veer_flow flow;
	struct veer_backend_value backend;
	int verdict;

	if (!veer_proto_handled(ctx->protocol))
		return 1;
	veer_flow6(ctx, &flow);
	verdict = veer_forward(ctx, hook, &flow, &backend);
	if (verdict == VEER_REFUSE || verdict == VEER_UNREACHABLE) {
		bpf_set_retval(verdict == VEER_REFUSE ? -VEER_ECONNREFUSED : -VEER_EHOSTUNREACH);
		return 0;
	}
	if (verdict == VEER_TRANSLATE) {
		veer_store6(ctx, backend.addr, backend.family);
		ctx->user_port = (__u32)backend.port;
	}
	return 1;
}

static __always_inline int veer_untranslate6(struct bpf_sock_addr *ctx)
{
	struct veer_flow peer;
	struct veer_sock_revnat_value svc;

	if (!veer_proto_handled(ctx->protocol))
		return 1;
	veer_flow6(ctx, &peer);
	if (veer_reverse(ctx, &peer, &svc)) {
		veer_store6(ctx, svc.addr, peer.family);
		ctx->user_port = (__u32)svc.port;
	}
	return 1;
}

int veer_connect6(struct bpf_sock_addr *ctx)
{
	return veer_translate6(ctx, VEER_HOOK_CONNECT6);
}

int veer_sendmsg6(struct bpf_sock_addr *ctx)
{
	return veer_translate6(ctx, VEER_HOOK_SENDMSG6);
}

int veer_recvmsg6(struct bpf_sock_addr *ctx)
{
	return veer_untranslate6(ctx);
}

int veer_getpeername6(struct bpf_sock_addr *ctx)
{
	return veer_untranslate6(ctx);
}

/* ---- Socket release -------------------------------------------------------- */

/* A socket is going away: give back the connection LeastConnections counted
 * for it. */
int veer_sock_release(struct bpf_sock *ctx)
{
	__u64 cookie = veer_socket_cookie(ctx);
	struct veer_lc_sock_value *held = veer_lc_socks.lookup(&cookie);

	if (held) {
		veer_conns_add(held->backend_id, -1);
		veer_lc_socks.delete(&cookie);
	}
	return 1;
}

/* ---- Redirect: the original destination for the proxy ----------------------- */

#define VEER_SOCK_OPS_TCP_CONNECT_CB 3 /* BPF_SOCK_OPS_TCP_CONNECT_CB */
#define VEER_SOCK_OPS_ACTIVE_ESTABLISHED_CB 4
#define VEER_SOCK_OPS_PASSIVE_ESTABLISHED_CB 5

/* A TCP connect() is about to send its SYN: the local port is known now. If
 * the socket was redirected, file its original destination under its own
 * end (address, port), where the proxy's accepted socket will look for it.
 * Established connections are offered to sockmap acceleration (sockmap.c). */
int veer_sockops(struct bpf_sock_ops *skops)
{
	__u64 cookie;
	struct veer_orig_value *orig;
	struct veer_orig_key key = {};

	if (skops->op == VEER_SOCK_OPS_ACTIVE_ESTABLISHED_CB ||
	    skops->op == VEER_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		veer_accel_established(skops, skops->op == VEER_SOCK_OPS_ACTIVE_ESTABLISHED_CB);
		return 1;
	}
	if (skops->op != VEER_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = veer_socket_cookie(skops);
	orig = veer_redirect_socks.lookup(&cookie);
	if (!orig)
		return 1;
	veer_sock_addr(key.addr, &key.family, skops->family, skops->local_ip4,
		       skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
		       skops->local_ip6[3]);
	key.port = bpf_htons((__u16)skops->local_port);
	veer_orig_dst.update(&key, orig);
	veer_redirect_socks.delete(&cookie);
	return 1;
}

#define VEER_SOL_IP 0
#define VEER_SOL_IPV6 41
#define VEER_SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */

struct veer_sockaddr_in {
	__u16 family;
	__be16 port;
	__u8 addr[4];
	__u8 zero[8];
};

struct veer_sockaddr_in6 {
	__u16 family;
	__be16 port;
	__u32 flowinfo;
	__u8 addr[16];
	__u32 scope_id;
};

/* getsockopt(SO_ORIGINAL_DST) on a connection the proxy accepted: answer with
 * the destination the client dialled before veer redirected it, as
 * conntrack would for an iptables REDIRECT, so proxies that use the option
 * work unchanged. Every other getsockopt passes untouched. */
int veer_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct veer_orig_key key = {};
	struct veer_orig_value *orig;

	if (ctx->optname != VEER_SO_ORIGINAL_DST ||
	    (ctx->level != VEER_SOL_IP && ctx->level != VEER_SOL_IPV6) || !sk)
		return 1;
	veer_sock_addr(key.addr, &key.family, sk->family, sk->dst_ip4, sk->dst_ip6[0],
		       sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]);
	key.port = (__be16)sk->dst_port;
	orig = veer_orig_dst.lookup(&key);
	if (!orig)
		return 1;
	if (ctx->level == VEER_SOL_IP && orig->family == VEER_FAMILY_IPV4) {
		struct veer_sockaddr_in *sin = ctx->optval;

		if ((void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->family = 2;
		sin->port = orig->port;
		__builtin_memcpy(sin->addr, orig->addr, 4);
		__builtin_memset(sin->zero, 0, 8);
		ctx->optlen = sizeof(*sin);
	} else if (ctx->level == VEER_SOL_IPV6 && orig->family == VEER_FAMILY_IPV6) {
		struct veer_sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = 10;
		sin6->port = orig->port;
		sin6->flowinfo = 0;
		__builtin_memcpy(sin6->addr, orig->addr, 16);
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	} else {
		return 1;
	}
	ctx->retval = 0;
	veer_count(VEER_CNT_ORIG_DST);
	return 1;
}
