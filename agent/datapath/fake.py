"""FakeDatapath: dicts behind the real interface, for tests of the layers above.

It records every call in `calls` (so a test can assert the order of writes)
and can be told to fail on chosen frontends to exercise error paths.
"""

from __future__ import annotations

from agent.compute.types import Frontend, L4Addr
from agent.datapath.interface import Datapath, DatapathState, ProgrammedFrontend
from agent.errors import DatapathError
from agent.model.objects import IPAddress, IPNetwork


class FakeDatapath(Datapath):
    name = "fake"

    def __init__(self) -> None:
        self.state = DatapathState()
        self.calls: list[tuple[str, str]] = []
        self.fail_on: set[L4Addr] = set()
        self.fail_dump = False

    def dump(self) -> DatapathState:
        self.calls.append(("dump", ""))
        if self.fail_dump:
            raise DatapathError("fake: dump failed")
        return DatapathState(
            frontends=dict(self.state.frontends),
            vips=set(self.state.vips),
            service_cidrs=set(self.state.service_cidrs),
        )

    def upsert_frontend(self, frontend: Frontend) -> bool:
        self.calls.append(("upsert_frontend", str(frontend.key)))
        if frontend.key in self.fail_on:
            raise DatapathError(f"fake: cannot write frontend {frontend.key}")
        programmed = ProgrammedFrontend.of(frontend)
        if self.state.frontends.get(frontend.key) == programmed:
            return False
        self.state.frontends[frontend.key] = programmed
        return True

    def delete_frontend(self, key: L4Addr) -> bool:
        self.calls.append(("delete_frontend", str(key)))
        if key in self.fail_on:
            raise DatapathError(f"fake: cannot delete frontend {key}")
        return self.state.frontends.pop(key, None) is not None

    def upsert_vip(self, address: IPAddress) -> bool:
        self.calls.append(("upsert_vip", str(address)))
        if address in self.state.vips:
            return False
        self.state.vips.add(address)
        return True

    def delete_vip(self, address: IPAddress) -> bool:
        self.calls.append(("delete_vip", str(address)))
        if address not in self.state.vips:
            return False
        self.state.vips.discard(address)
        return True

    def upsert_service_cidr(self, cidr: IPNetwork) -> bool:
        self.calls.append(("upsert_service_cidr", str(cidr)))
        if cidr in self.state.service_cidrs:
            return False
        self.state.service_cidrs.add(cidr)
        return True

    def delete_service_cidr(self, cidr: IPNetwork) -> bool:
        self.calls.append(("delete_service_cidr", str(cidr)))
        if cidr not in self.state.service_cidrs:
            return False
        self.state.service_cidrs.discard(cidr)
        return True
