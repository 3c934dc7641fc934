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
static __always_inline void veer_report(void *ctx, __u8 hook, __u32 reason, __u8 flags,
					__u32 service_id, __u8 family, __u8 proto,
					const __u8 *saddr, __be16 sport,
					const __u8 *daddr, __be16 dport,
					const __u8 *baddr, __be16 bport)
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
	if (hook != VEER_HOOK_TC_INGRESS) {
		ev->cookie = veer_socket_cookie(ctx);
		ev->netns = bpf_get_netns_cookie(ctx);
		ev->pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	}
	veer_events.ringbuf_submit(ev, veer_is_translation(reason) ? VEER_RB_NO_WAKEUP : 0);
	veer_count(VEER_CNT_EVENTS_SENT);
}

/* The backend an affinity entry names, or 0: an entry counts while it is
 * younger than the frontend's timeout and its backend still serves the
 * frontend (veer_affinity_match); the caller refreshes it on use. Shared by
 * the socket path (keyed by netns cookie) and the per-packet path (keyed by
 * client address). */
static __always_inline __u32 veer_affinity_backend(const struct veer_affinity_value *entry,
						   __u32 service_id, __u32 timeout_seconds)
{
	struct veer_affinity_match_key match = {};

	if (!entry)
		return 0;
	if (bpf_ktime_get_ns() - entry->last_used_ns > timeout_seconds * 1000000000ULL)
		return 0;
	match.backend_id = entry->backend_id;
	match.service_id = service_id;
	if (!veer_affinity_match.lookup(&match))
		return 0;
	veer_count(VEER_CNT_AFFINITY_HIT);
	return entry->backend_id;
}
