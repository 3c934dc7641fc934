/* SPDX-License-Identifier: Apache-2.0 */
/* Helpers every program uses. First part of the text the agent compiles
 * (see veer_common.h for why the parts are concatenated, not included). */
#include "veer_common.h"

/* BCC 0.26 declares bpf_get_socket_cookie as returning u32, truncating the
 * cookie; declare it with the kernel's real signature. */
static __u64 (*veer_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#define VEER_RB_NO_WAKEUP 1 /* BPF_RB_NO_WAKEUP */

static __always_inline void veer_count(__u32 idx)
{
	__u64 *counter = veer_counters.lookup(&idx);

	if (counter)
		*counter += 1;
}

/* Whether a verdict is reported at all. Translations are the common case
 * (every connect() to a Service): they cost a ring-buffer record each, so
 * they are reported only while the agent asks (veer_config.trace_translations,
 * set while a client observes them). Everything else is rare and always
 * reported. */
static __always_inline int veer_is_translation(__u32 reason)
{
	return reason == VEER_CNT_TRANSLATED || reason == VEER_CNT_NAT_NEW;
}

static __always_inline int veer_report_wanted(__u32 reason)
{
	__u32 zero = 0;
	struct veer_config *config;

	if (!veer_is_translation(reason))
		return 1;
	config = veer_config.lookup(&zero);
	return config && config->trace_translations;
}

/* Report one verdict to the agent: the only writer of veer_events.
 *
 * `reason` is the verdict as counted (enum veer_counter); `hook` and the
 * flags say where and how. Addresses point to 16 bytes in the layout of
 * veer_structs.h and may be NULL (unknown: a socket hook has no source yet;
 * nothing was chosen). `ctx` is the program's context: for socket hooks the
 * socket cookie, the caller's network namespace and process are recorded
 * from it. Callers pass `hook` as a constant, so the socket-only calls
 * vanish from the TC programs when this is inlined.
 *
 * The record is written in place (reserve, fill, submit). A full buffer
 * loses the event and counts VEER_CNT_EVENTS_LOST; the verdict itself is
 * never affected. Translations are submitted without waking the agent (it
 * drains the buffer every 100 ms anyway): a wakeup per connect() would cost
 * the connecting CPU an irq_work and an IPI each. Other events wake it, so
 * a refusal shows at once unless translations are queued ahead of it. */
static __always_inline void veer_report_rule(void *ctx, __u8 hook, __u32 reason, __u8 flags,
					     __u32 service_id, __u8 family, __u8 proto,
					     const __u8 *saddr, __be16 sport,
					     const __u8 *daddr, __be16 dport,
					     const __u8 *baddr, __be16 bport, __u16 rule)
{
	struct veer_event *ev;

	if (!veer_report_wanted(reason))
		return;
	ev = veer_events.ringbuf_reserve(sizeof(struct veer_event));
	if (!ev) {
		veer_count(VEER_CNT_EVENTS_LOST);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->time_ns = bpf_ktime_get_ns();
	ev->reason = reason;
	ev->hook = hook;
	ev->flags = flags;
	ev->service_id = service_id;
	ev->family = family;
	ev->proto = proto;
	if (saddr)
		__builtin_memcpy(ev->saddr, saddr, 16);
	ev->sport = sport;
	if (daddr)
		__builtin_memcpy(ev->daddr, daddr, 16);
	ev->dport = dport;
	if (baddr)
		__builtin_memcpy(ev->baddr, baddr, 16);
	ev->bport = bport;
	ev->rule = rule;
	if (hook != VEER_HOOK_TC_INGRESS) {
		ev->cookie = veer_socket_cookie(ctx);
		ev->netns = bpf_get_netns_cookie(ctx);
		ev->pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	}
	veer_events.ringbuf_submit(ev, veer_is_translation(reason) ? VEER_RB_NO_WAKEUP : 0);
	veer_count(VEER_CNT_EVENTS_SENT);
}

/* Whether two addresses in veer's 16-byte form (4-byte aligned) are equal. */
static __always_inline int veer_same_addr(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* An address as a socket's context gives it (ip4, or four ip6 words by
 * family_in, AF_INET or AF_INET6) into veer's 16-byte form, IPv4-mapped IPv6
 * normalized to IPv4; *family gets VEER_FAMILY_*. */
static __always_inline void veer_sock_addr(__u8 *out, __u8 *family, __u32 family_in,
					   __u32 ip4, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	if (family_in == 2 /* AF_INET */) {
		__builtin_memcpy(out, &ip4, 4);
		*family = VEER_FAMILY_IPV4;
	} else if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff)) {
		__builtin_memcpy(out, &w3, 4);
		*family = VEER_FAMILY_IPV4;
	} else {
		__builtin_memcpy(out, &w0, 4);
		__builtin_memcpy(out + 4, &w1, 4);
		__builtin_memcpy(out + 8, &w2, 4);
		__builtin_memcpy(out + 12, &w3, 4);
		*family = VEER_FAMILY_IPV6;
	}
}

/* veer_report_rule for verdicts that no access rule took. */
static __always_inline void veer_report(void *ctx, __u8 hook, __u32 reason, __u8 flags,
					__u32 service_id, __u8 family, __u8 proto,
					const __u8 *saddr, __be16 sport,
					const __u8 *daddr, __be16 dport,
					const __u8 *baddr, __be16 bport)
{
	veer_report_rule(ctx, hook, reason, flags, service_id, family, proto, saddr, sport,
			 daddr, dport, baddr, bport, 0);
}

/* The backend an affinity entry names, or 0: an entry counts while it is
 * younger than the frontend's timeout and its backend still serves the
 * frontend (veer_affinity_match); the caller refreshes it on use. Shared by
 * the socket path (keyed by netns cookie) and the per-packet path (keyed by
 * client address). */
static __always_inline __u32 veer_affinity_backend(const struct veer_affinity_value *entry,
						   __u32 service_id, __u32 scope,
						   __u32 timeout_seconds)
{
	struct veer_affinity_match_key match = {};
	__u64 now, used;

	if (!entry)
		return 0;
	now = bpf_ktime_get_ns();
	used = entry->last_used_ns;
	/* Another CPU may have refreshed the entry since this one read its
	 * clock: then it is newer than `now`, not ancient. */
	if (used < now && now - used > timeout_seconds * 1000000000ULL)
		return 0;
	match.backend_id = entry->backend_id;
	match.service_id = service_id;
	match.scope = scope;
	if (!veer_affinity_match.lookup(&match))
		return 0;
	veer_count(VEER_CNT_AFFINITY_HIT);
	return entry->backend_id;
}

/* ---- TrafficPolicy: access rules ------------------------------------------ */

/* Whether `client` may open a flow to frontend `service_id` (flags: the
 * frontend's). *rule gets the deciding rule (VEER_RULE_DEFAULT: none matched),
 * whose hit counter is bumped. */
static __always_inline int veer_access_allowed(__u32 service_id, __u16 flags, __u8 family,
					       const __u8 *client, __u16 *rule)
{
	struct veer_source_key key = {};
	struct veer_access_value *found;
	struct veer_rule_key hit = {};
	__u64 one = 1, *hits;
	int allow;

	key.prefixlen = 32 + 32 + 128;
	key.service_id = service_id;
	key.family = family;
	__builtin_memcpy(key.addr, client, 16);
	found = veer_access.lookup(&key);
	if (found) {
		*rule = (__u16)found->rule;
		allow = found->action == VEER_ACCESS_ALLOW;
	} else {
		*rule = VEER_RULE_DEFAULT;
		allow = !(flags & VEER_SVC_F_ACCESS_DENY);
	}
	hit.service_id = service_id;
	hit.rule = *rule;
	hits = veer_access_hits.lookup(&hit);
	if (hits)
		*hits += 1;
	else
		veer_access_hits.update(&hit, &one);
	return allow;
}

/* ---- TrafficPolicy: load-balancing algorithms ------------------------------ */

static __always_inline __u32 veer_rotl32(__u32 x, __u32 r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 veer_hash_word(__u32 h, __u32 w)
{
	w *= 0xcc9e2d51;
	w = veer_rotl32(w, 15);
	w *= 0x1b873593;
	h ^= w;
	h = veer_rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

/* A flow's hash for Maglev: murmur3 (32-bit) over the client's 16 address
 * bytes (four words, as loaded), its port as carried (network order) and the
 * protocol. agent/compute/tables.py flow_hash() is the same function; keep
 * them equal. */
static __always_inline __u32 veer_flow_hash(const __u8 *client, __be16 port, __u8 proto)
{
	__u32 w[4], h = 0x5ee2;

	__builtin_memcpy(w, client, 16);
	h = veer_hash_word(h, w[0]);
	h = veer_hash_word(h, w[1]);
	h = veer_hash_word(h, w[2]);
	h = veer_hash_word(h, w[3]);
	h = veer_hash_word(h, (__u32)port);
	h = veer_hash_word(h, (__u32)proto);
	h ^= 6 * 4;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* LeastConnections looks at no more than this many slots, from a random one
 * (so ties spread): exact up to this many backends, sampled beyond. */
#define VEER_LC_SCAN 16

/* The slot whose backend has the fewest open connections per unit of weight.
 * Only scalars are carried from one iteration to the next (a pointer that is
 * NULL on some paths would multiply the verifier's states by the loop). */
static __always_inline struct veer_service_value *veer_least_conn(struct veer_service_key *key,
								  __u16 count)
{
	struct veer_service_value *slot;
	struct veer_conns_value *conns;
	struct veer_conns_swept_value *swept;
	__u32 start = bpf_get_prandom_u32(), i, id, weight, open;
	__u64 score, best_score = ~0ULL;
	__u16 best_slot = 0;

	/* Unrolled, each step joins the next with only scalars on the stack, so
	 * the verifier's paths do not multiply from one candidate to the next. */
#pragma unroll
	for (i = 0; i < VEER_LC_SCAN; i++) {
		if (i < count) {
			key->slot = (start + i) % count + 1;
			slot = veer_services.lookup(key);
			if (slot) {
				id = slot->backend_id;
				weight = slot->count | (slot->count == 0); /* 0 means 1 */
				conns = veer_backend_conns.lookup(&id);
				swept = veer_backend_conns_swept.lookup(&id);
				open = conns ? conns->open : 0;
				if (swept)
					open = open > swept->swept ? open - swept->swept : 0;
				score = ((__u64)open << 32) / weight;
				if (score < best_score) {
					best_score = score;
					best_slot = key->slot;
				}
			}
		}
	}
	if (!best_slot)
		return NULL;
	key->slot = best_slot;
	return veer_services.lookup(key);
}

/* The backend slot a new flow takes, by the frontend's algorithm; NULL if a
 * slot is missing (which the writers' order makes impossible). `key` is the
 * frontend's key and is clobbered; `hash` is the flow's (Maglev). */
static __always_inline struct veer_service_value *veer_pick(struct veer_service_key *key,
							    __u16 count, __u16 flags,
							    __u32 service_id, __u32 hash)
{
	__u32 algorithm = (flags & VEER_SVC_ALG_MASK) >> VEER_SVC_ALG_SHIFT;
	__u32 pos, *cursor;

	if (algorithm == VEER_ALG_LEAST_CONN)
		return veer_least_conn(key, count);
	if (algorithm == VEER_ALG_MAGLEV) {
		pos = hash;
	} else if (algorithm == VEER_ALG_ROUND_ROBIN) {
		/* Read, then advance atomically: two CPUs may read one value at
		 * the same instant and both take that slot, never skip one. */
		cursor = veer_rr_cursor.lookup(&service_id);
		pos = cursor ? *cursor : bpf_get_prandom_u32();
		if (cursor)
			__sync_fetch_and_add(cursor, 1);
	} else {
		pos = bpf_get_prandom_u32();
	}
	key->slot = pos % count + 1;
	return veer_services.lookup(key);
}

/* Count a connection against `backend_id` (LeastConnections), remembering it
 * by socket cookie so that veer_sock_release gives it back. A socket that
 * connects again gives back its previous backend first. */
static __always_inline void veer_conns_add(__u32 backend_id, int delta)
{
	struct veer_conns_value *conns = veer_backend_conns.lookup(&backend_id);

	if (!conns)
		return;
	if (delta > 0)
		__sync_fetch_and_add(&conns->open, 1);
	else if (conns->open > 0)
		__sync_fetch_and_add(&conns->open, -1);
}

static __always_inline void veer_lc_hold(void *ctx, __u32 backend_id)
{
	__u64 cookie = veer_socket_cookie(ctx);
	struct veer_lc_sock_value *held = veer_lc_socks.lookup(&cookie);
	struct veer_lc_sock_value fresh = { .backend_id = backend_id };

	if (held)
		veer_conns_add(held->backend_id, -1);
	if (veer_lc_socks.update(&cookie, &fresh) == 0)
		veer_conns_add(backend_id, 1);
}

/* Give back the count a per-packet flow holds, if it holds one. Whoever
 * deletes the entry gives the count back: a FIN seen on two CPUs at once, or
 * the agent's sweep racing a late FIN, still gives it back exactly once. */
static __always_inline void veer_lc_flow_release(const struct veer_tuple *t)
{
	struct veer_lc_sock_value *held = veer_lc_flows.lookup((struct veer_tuple *)t);
	__u32 backend_id;
	int gone;

	if (!held)
		return;
	backend_id = held->backend_id;
	gone = veer_lc_flows.delete((struct veer_tuple *)t);
	if (gone == 0)
		veer_conns_add(backend_id, -1);
}

/* Count a new per-packet flow (client tuple `t`) against `backend_id`; a flow
 * reusing the tuple of a counted one gives that one back first. */
static __always_inline void veer_lc_flow_hold(const struct veer_tuple *t, __u32 backend_id)
{
	struct veer_lc_sock_value fresh = { .backend_id = backend_id };
	int stored;

	veer_lc_flow_release(t);
	stored = veer_lc_flows.update((struct veer_tuple *)t, &fresh);
	if (stored == 0)
		veer_conns_add(backend_id, 1);
}
