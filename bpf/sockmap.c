/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockmap acceleration: two sockets of one TCP connection that are both on
 * this node hand each other their data directly (sk_msg redirect to the
 * peer's receive queue), skipping TCP/IP, the veth pair and the softirqs.
 *
 * Compiled only with -DVEER_SOCKMAP, which the agent passes when its
 * start-up probe passed (features present, kernel series verified:
 * agent/datapath/ebpf/probe.py); otherwise the stubs at the end make every
 * call a no-op and every connection takes the normal path.
 *
 * Which connections: connect() marks a socket (by cookie) when its frontend
 * has VEER_SVC_F_SOCKMAP. At ACTIVE_ESTABLISHED (the SYN-ACK is in; the
 * local port is known; connect() has not returned) the marked socket joins
 * veer_sock_hash and leaves a note for its peer; at PASSIVE_ESTABLISHED
 * (before accept() returns) the peer, if it is on this node and in veer's
 * cgroup, finds the note and joins too.
 *
 * Ordering, the reason other projects dropped this: data of one direction
 * must never be split between the two paths, or the receiver could read
 * later bytes (spliced into its queue) before earlier ones (still in TCP).
 * So each direction decides once, on its first message: if the peer is in
 * the map the message and every later one are spliced; if not (a peer on
 * another node, or not joined yet) that direction stays on TCP for good.
 * Both sockets are in the map before their owners can send anything (see
 * above), so all of a spliced direction's bytes take the splice. If the peer
 * goes away, a spliced direction falls back to TCP, which then carries
 * nothing but the RST the peer's kernel answers with.
 */
#include "veer_common.h"

#define VEER_SK_PASS 1
#define VEER_F_INGRESS 1 /* BPF_F_INGRESS */

/* A direction's decision (veer_accel_mode). */
#define VEER_ACCEL_SPLICE 1
#define VEER_ACCEL_TCP 2

#ifdef VEER_SOCKMAP

/* The sockets being spliced (not pinned: its entries are live sockets, and
 * the sk_msg program is attached to it). */
BPF_SOCKHASH(veer_sock_hash, struct veer_sock_key, 65536);

/* Sockets marked at connect(), by cookie, until ACTIVE_ESTABLISHED. */
BPF_TABLE("lru_hash", __u64, __u32, veer_accel_socks, 65536);

/* Notes for the passive side, keyed by its own view of the connection. */
BPF_TABLE("lru_hash", struct veer_sock_key, __u32, veer_accel_pending, 65536);

/* Each direction's decision, keyed by the sending socket. */
BPF_TABLE("lru_hash", struct veer_sock_key, __u32, veer_accel_mode, 131072);

static __always_inline void veer_accel_mark(void *ctx)
{
	__u64 cookie = veer_socket_cookie(ctx);
	__u32 one = 1;

	veer_accel_socks.update(&cookie, &one);
}

/* The remote port fields hold the port in network order, shifted left by
 * 16 bits (the kernel's own conversion); the local port is in host order. */
static __always_inline void veer_sock_key_of_ops(struct bpf_sock_ops *skops,
						 struct veer_sock_key *key)
{
	__u8 family;

	veer_sock_addr(key->local, &family, skops->family, skops->local_ip4,
		       skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
		       skops->local_ip6[3]);
	veer_sock_addr(key->remote, &key->family, skops->family, skops->remote_ip4,
		       skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
		       skops->remote_ip6[3]);
	key->lport = bpf_htons((__u16)skops->local_port);
	key->rport = (__be16)(skops->remote_port >> 16);
}

static __always_inline void veer_sock_key_swap(const struct veer_sock_key *in,
					       struct veer_sock_key *out)
{
	__builtin_memcpy(out->local, in->remote, 16);
	__builtin_memcpy(out->remote, in->local, 16);
	out->lport = in->rport;
	out->rport = in->lport;
	out->family = in->family;
}

/* sockops: a connection is established on this socket. */
static __always_inline void veer_accel_established(struct bpf_sock_ops *skops, int active)
{
	struct veer_sock_key key = {}, peer = {};
	__u64 cookie;
	__u32 one = 1;
	long joined;

	veer_sock_key_of_ops(skops, &key);
	if (active) {
		cookie = veer_socket_cookie(skops);
		if (!veer_accel_socks.lookup(&cookie))
			return;
		veer_accel_socks.delete(&cookie);
		veer_sock_key_swap(&key, &peer);
		veer_accel_pending.update(&peer, &one);
	} else {
		if (!veer_accel_pending.lookup(&key))
			return;
		veer_accel_pending.delete(&key);
	}
	/* A reused 4-tuple must not inherit an old connection's decision. */
	veer_accel_mode.delete(&key);
	/* (BCC wants its map calls as whole statements.) */
	joined = veer_sock_hash.sock_hash_update(skops, &key, 0 /* BPF_ANY */);
	if (joined == 0)
		veer_count(VEER_CNT_ACCEL_SOCKETS);
}

/* sk_msg, on every send of a socket in veer_sock_hash. */
int veer_sk_msg(struct sk_msg_md *msg)
{
	struct veer_sock_key key = {}, peer = {};
	__u32 *mode, decided;
	long verdict;

	veer_sock_addr(key.local, &key.family, msg->family, msg->local_ip4, msg->local_ip6[0],
		       msg->local_ip6[1], msg->local_ip6[2], msg->local_ip6[3]);
	veer_sock_addr(key.remote, &key.family, msg->family, msg->remote_ip4,
		       msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2],
		       msg->remote_ip6[3]);
	key.lport = bpf_htons((__u16)msg->local_port);
	key.rport = (__be16)(msg->remote_port >> 16);
	mode = veer_accel_mode.lookup(&key);
	if (mode && *mode == VEER_ACCEL_TCP)
		return VEER_SK_PASS;
	veer_sock_key_swap(&key, &peer);
	verdict = veer_sock_hash.msg_redirect_hash(msg, &peer, VEER_F_INGRESS);
	if (verdict == VEER_SK_PASS) {
		if (!mode) {
			decided = VEER_ACCEL_SPLICE;
			veer_accel_mode.update(&key, &decided);
			veer_count(VEER_CNT_ACCEL_SPLICED);
		}
		return VEER_SK_PASS;
	}
	if (!mode) {
		/* First message and the peer is not here: TCP for good. */
		decided = VEER_ACCEL_TCP;
		veer_accel_mode.update(&key, &decided);
		veer_count(VEER_CNT_ACCEL_TCP);
	}
	/* A spliced direction whose peer is gone: TCP carries the rest (the
	 * peer's kernel answers with a reset, as without acceleration). */
	return VEER_SK_PASS;
}

#else /* !VEER_SOCKMAP */

static __always_inline void veer_accel_mark(void *ctx)
{
}

static __always_inline void veer_accel_established(struct bpf_sock_ops *skops, int active)
{
}

#endif /* VEER_SOCKMAP */
