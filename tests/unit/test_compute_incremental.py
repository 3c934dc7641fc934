"""compute_desired with a ComputeCache, fed the snapshots of one Store, looks
at the Services the Store's change log names only (agent/model/snapshot.py
touched_since) and updates the frontends in force one Service at a time
(agent/compute/desired.py _Assembly). Whatever the changes, its result must
be the one a fresh computation gives: frontends (and their order), VIPs,
problems (conflicts included, in order) and health checks."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest
from builders import ep, eport, eps, models, node, port, service

from agent.compute import ComputeConfig, NodeIdentity, compute_desired
from agent.compute.desired import ComputeCache
from agent.compute.types import DesiredState, Frontend, L4Addr
from agent.datapath.fake import FakeDatapath
from agent.datapath.interface import ProgrammedFrontend
from agent.model.objects import ObjectRef
from agent.model.snapshot import ClusterSnapshot, Store, touched_since
from agent.reconcile.reconciler import Reconciler

NODE = NodeIdentity("node-1", addresses=(ipaddress.ip_address("192.168.1.10"),))
NAMES = [f"s{i}" for i in range(8)]
# Few addresses for many Services: conflicts happen.
IPS = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4", "fd00:96::1"]


def random_service(rng: random.Random, name: str) -> dict[str, Any]:
    ports = [port("http", 80, 8080)]
    if rng.random() < 0.3:
        ports.append(port("dns", 53, 5353, protocol=rng.choice(["UDP", "SCTP"])))
    spec: dict[str, Any] = {}
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])
    if kind != "ClusterIP":
        ports = [{**p, "nodePort": 30000 + rng.randrange(3)} for p in ports]
    if kind == "LoadBalancer" and rng.random() < 0.5:
        spec |= {"externalTrafficPolicy": "Local",
                 "healthCheckNodePort": 32000 + rng.randrange(2)}
    if rng.random() < 0.2:
        spec["externalIPs"] = [rng.choice(["203.0.113.7", "203.0.113.8"])]
    return service(name, *ports, ips=rng.choice(IPS), type=kind, **spec)


def random_slice(rng: random.Random) -> dict[str, Any]:
    owner = rng.choice([*NAMES, None])
    endpoints = [ep(f"10.244.{rng.randrange(3)}.{rng.randrange(1, 4)}",
                    ready=rng.random() < 0.8, node=rng.choice(["node-1", "node-2"]))
                 for _ in range(rng.randrange(3))]
    return eps(f"slice-{rng.randrange(10)}", owner, *endpoints,
               ports=[eport("http", 8080), eport("dns", 5353, "UDP")], address_type="IPv4")


def policy(rng: random.Random) -> dict[str, Any]:
    spec: dict[str, Any] = {"targetRefs": [{"name": rng.choice(NAMES)}]}
    if rng.random() < 0.5:
        spec["algorithm"] = "Maglev"
    return {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "tp", "namespace": "default"}, "spec": spec}


def step(rng: random.Random, store: Store) -> None:
    """One to three random changes, as one source event each."""
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        if roll < 0.35:
            store.apply(upserts=models(random_service(rng, rng.choice(NAMES))))
        elif roll < 0.45:
            store.apply(deletes=[ObjectRef("Service", "default", rng.choice(NAMES))])
        elif roll < 0.8:
            store.apply(upserts=models(random_slice(rng)))
        elif roll < 0.9:
            store.apply(deletes=[ObjectRef("EndpointSlice", "default",
                                           f"slice-{rng.randrange(10)}")])
        elif roll < 0.95:
            store.apply(upserts=models(node("node-1", zone=rng.choice(["a", "b"]))))
        elif roll < 0.975:
            store.apply(upserts=models(policy(rng)))
        else:
            store.apply(deletes=[ObjectRef("TrafficPolicy", "default", "tp")])


@pytest.mark.parametrize("seed", range(12))
def test_the_cache_gives_what_a_fresh_computation_gives(seed: int) -> None:
    rng = random.Random(seed)
    store, cache, config = Store(), ComputeCache(), ComputeConfig()
    incremental = 0
    previous: ClusterSnapshot | None = None
    for _ in range(150):
        step(rng, store)
        if rng.random() < 0.2:
            store.snapshot()  # a snapshot compute never sees (the API, the reporter)
            continue
        snapshot = store.snapshot()
        if previous is not None and touched_since(previous, snapshot) is not None:
            incremental += 1
        previous = snapshot
        got = compute_desired(snapshot, NODE, config, cache)
        fresh = compute_desired(snapshot, NODE, config)
        assert got == fresh
        assert list(got.frontends) == list(fresh.frontends)
        assert got.problems == fresh.problems
    assert incremental > 50  # the log was followed, not only full passes


def test_the_log_names_the_services_touched() -> None:
    store = Store()
    store.apply(upserts=models(service("web", port("http", 80)), node("node-1")))
    first = store.snapshot()
    assert touched_since(ClusterSnapshot(), first) is None  # not of this Store
    store.apply(upserts=models(eps("web-1", "web", ep("10.244.1.2"))))
    store.apply(upserts=models(eps("api-1", "api", ep("10.244.1.3"))))
    second = store.snapshot()
    assert touched_since(first, second) == {("default", "web"), ("default", "api")}
    assert touched_since(second, second) == set()
    # A slice that moves to another Service touches both.
    store.apply(upserts=models(eps("web-1", "api", ep("10.244.1.2"))))
    third = store.snapshot()
    assert touched_since(second, third) == {("default", "web"), ("default", "api")}
    assert [s.meta.name for s in third.slices_for("default", "api")] == ["api-1", "web-1"]
    assert third.slices_for("default", "web") == ()
    # A Node may concern every Service.
    store.apply(upserts=models(node("node-1", zone="b")))
    assert touched_since(third, store.snapshot()) is None


@pytest.mark.parametrize("seed", range(6))
def test_the_reconciler_visits_what_compute_changed_and_holds_it_all(seed: int) -> None:
    """Incremental passes fed by the cache visit only the frontends compute
    says changed, and the datapath ends up holding exactly the desired state."""
    rng = random.Random(seed)
    store, cache, config = Store(), ComputeCache(), ComputeConfig()
    dp = FakeDatapath()
    used: list[DesiredState] = []  # what each pass applied

    def desired() -> DesiredState:
        used.append(compute_desired(store.snapshot(), NODE, config, cache))
        return used[-1]

    rec = Reconciler(dp, desired)
    visited: list[L4Addr] = []
    real = dp.programmed_of

    def counting(frontend: Frontend) -> ProgrammedFrontend:
        visited.append(frontend.key)
        return real(frontend)

    dp.programmed_of = counting  # type: ignore[method-assign]
    followed = 0
    for _ in range(100):
        step(rng, store)
        if rng.random() < 0.15:
            # A result no pass applied (as when a pass stops on an exception):
            # the next one must not take the delta from it alone.
            compute_desired(store.snapshot(), NODE, config, cache)
            step(rng, store)
        before = rec._last
        visited.clear()
        result = rec.sync(full=rng.random() < 0.1)
        assert result.ok, result.errors
        applied = used[-1]
        assert applied == compute_desired(store.snapshot(), NODE, config)
        assert {str(k): dp.state.frontends[k] for k in dp.state.frontends} == {
            str(k): real(fe) for k, fe in applied.frontends.items()}
        assert dp.state.vips == set(applied.vips)
        follows = applied.follows
        if not result.full and before is not None and follows and follows[0] == before.generation:
            assert set(visited) <= follows[1]
            followed += 1
    assert followed > 30


def test_an_unchanged_store_makes_a_pass_that_visits_nothing() -> None:
    store, cache, config = Store(), ComputeCache(), ComputeConfig()
    store.apply(upserts=models(*(service(f"s{i}", port("http", 80), ips=f"10.96.0.{i + 1}")
                                 for i in range(20))))
    dp = FakeDatapath()
    rec = Reconciler(dp, lambda: compute_desired(store.snapshot(), NODE, config, cache))
    rec.sync()
    dp.calls.clear()
    store.apply(upserts=models(service("s3", port("http", 81), ips="10.96.0.4")))
    assert rec.sync().ok
    assert dp.calls == [("upsert_frontend", "10.96.0.4:81/TCP"),
                        ("delete_frontend", "10.96.0.4:80/TCP")]
    dp.calls.clear()
    assert rec.sync().ok and dp.calls == []
