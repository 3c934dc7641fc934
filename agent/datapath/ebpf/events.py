"""The eBPF side of flow events: read veer_events, decode, hand to a sink.

    veer_report() in the BPF programs ──> veer_events (BPF ring buffer, 1 MiB)
        ──> EventConsumer thread: RingBuffer.poll(100 ms) (epoll on the map
            fd), woken by refusals and drops, then RingBuffer.consume():
            translations are submitted without a wakeup; one call per record
        ──> decode() ──> FlowEvent ──> sink(batch) (FlowHub.publish)

The ring buffer is not pinned: it belongs to the agent process that loaded
the programs. Records that do not fit are lost in the kernel and counted
(`events_lost` in veer_counters); the verdicts themselves never wait for us.

`decode` is pure (bytes in, FlowEvent out) and unit-tested; the consumer
reads the map through its fd (agent/datapath/ebpf/ringbuf.py), so the agent
needs no BCC for it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable

from agent.compute.types import L4Addr
from agent.datapath.ebpf.ringbuf import RingBuffer
from agent.datapath.ebpf.structs import (
    COUNTER_NAMES,
    EV_F_AFFINITY,
    EV_F_DSR,
    EV_F_MAPPED,
    EV_F_REDIRECT,
    EV_F_SHORT_CIRCUIT,
    EV_F_SNAT,
    HOOK_NAMES,
    HOOK_TC_INGRESS,
    PROTOCOL_OF,
    RULE_DEFAULT,
    Event,
    addr_from,
    port_host,
)
from agent.datapath.flows import ACCESS_REASONS, FlowEvent

log = logging.getLogger(__name__)

EVENT_SIZE = ctypes.sizeof(Event)
POLL_MS = 100
FLAG_NAMES = (
    (EV_F_AFFINITY, "affinity"),
    (EV_F_SNAT, "snat"),
    (EV_F_SHORT_CIRCUIT, "short_circuit"),
    (EV_F_MAPPED, "ipv4_mapped"),
    (EV_F_REDIRECT, "redirect"),
    (EV_F_DSR, "dsr"),
)

Sink = Callable[[list[FlowEvent]], None]


def monotonic_to_wall() -> float:
    """What to add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get Unix time."""
    return time.time() - time.monotonic()


def decode(raw: bytes, wall_offset: float) -> FlowEvent:
    """One veer_event record as a FlowEvent (the Service is not named yet).

    Raises ValueError on a record too short to be a veer_event.
    """
    if len(raw) < EVENT_SIZE:
        raise ValueError(f"flow event of {len(raw)} bytes, expected {EVENT_SIZE}")
    ev = Event.from_buffer_copy(raw[:EVENT_SIZE])
    reason = COUNTER_NAMES[ev.reason] if ev.reason < len(COUNTER_NAMES) else f"#{ev.reason}"
    protocol = PROTOCOL_OF.get(ev.proto)
    backend = None
    if any(ev.baddr) or ev.bport:
        backend = L4Addr(addr_from(ev.baddr, ev.family), port_host(ev.bport),
                         protocol) if protocol is not None else None
    tc = ev.hook == HOOK_TC_INGRESS
    access = reason in ACCESS_REASONS
    return FlowEvent(
        time=ev.time_ns / 1e9 + wall_offset,
        reason=reason,
        hook=HOOK_NAMES.get(ev.hook, f"hook {ev.hook}"),
        protocol=protocol.value if protocol is not None else str(ev.proto),
        destination=addr_from(ev.daddr, ev.family),
        port=port_host(ev.dport),
        # Socket hooks know the client's address only when access rules
        # looked it up (from its network namespace).
        source=addr_from(ev.saddr, ev.family) if tc or any(ev.saddr) else None,
        source_port=port_host(ev.sport) if tc else 0,
        backend=backend,
        service_id=int(ev.service_id),
        cookie=int(ev.cookie),
        netns=int(ev.netns),
        pid=int(ev.pid),
        comm=ev.comm.decode(errors="replace"),
        flags=tuple(name for bit, name in FLAG_NAMES if ev.flags & bit),
        rule=(None if ev.rule == RULE_DEFAULT else int(ev.rule)) if access else None,
        access_default=access and ev.rule == RULE_DEFAULT,
    )


class EventConsumer:
    """A thread that polls the ring buffer and hands decoded batches to `sink`.

    `map_fd` is veer_events' fd (the caller's; it must stay open while the
    consumer runs). The sink runs on this thread and must not block for long
    (FlowHub.publish never does); while it runs, the kernel keeps filling the
    1 MiB buffer.
    """

    def __init__(self, map_fd: int, sink: Sink, poll_ms: int = POLL_MS) -> None:
        self._map_fd = map_fd
        self._sink = sink
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._batch: list[FlowEvent] = []
        self._offset = monotonic_to_wall()
        self._ring: RingBuffer | None = None
        self._thread: threading.Thread | None = None
        self.decode_errors = 0

    def _on_record(self, data: bytes) -> None:
        try:
            self._batch.append(decode(data, self._offset))
        except (ValueError, IndexError):
            self.decode_errors += 1

    def start(self) -> None:
        self._ring = RingBuffer(self._map_fd)
        self._thread = threading.Thread(target=self._run, args=(self._ring,),
                                        name="flow-events", daemon=True)
        self._thread.start()
        log.info("reading flow events from the veer_events ring buffer")

    def _run(self, ring: RingBuffer) -> None:
        while not self._stop.is_set():
            # The wall clock may be stepped; re-read the offset once per poll.
            self._offset = monotonic_to_wall()
            try:
                # Wait for a wakeup (rare events ask for one) or the timeout,
                # then drain everything, translations submitted without one too.
                ring.poll(self._poll_ms / 1000)
                ring.consume(self._on_record)
            except OSError:
                log.exception("polling the flow event ring buffer failed")
                self._stop.wait(1.0)
                continue
            if self._batch:
                batch, self._batch = self._batch, []
                try:
                    self._sink(batch)
                except Exception:  # a bad sink must not stop the consumer
                    log.exception("handling %d flow event(s) failed", len(batch))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            if self._thread.is_alive():
                # Unmapping under a reader would crash the process: leave the
                # mapping to the process's exit.
                log.warning("the flow event reader did not stop within 5 s")
                return
            self._thread = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
