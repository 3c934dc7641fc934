"""ManifestSource: a directory of YAML/JSON manifests kept in a Store."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from builders import ep, eport, eps, port, service

from agent.compute.policy import policies_in_force
from agent.compute.types import ComputeConfig
from agent.errors import ManifestError
from agent.model.parse import Model
from agent.model.snapshot import Store
from agent.sources import manifests
from agent.sources.manifests import ManifestSource, ScanReport, parse_file

# Long past (so a file is read at once: it has settled), and finer than a
# second (a whole-second mtime could be a rounded one, and needs two looks).
_mtime = itertools.count(1_700_000_000_000_000_001, 1_000_000_000)


def write(path: Path, text: str) -> Path:
    """Write a file and give it a fresh, long-past mtime, so a rewrite is
    always noticed, and read at once (it has settled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    stamp = next(_mtime)
    os.utime(path, ns=(stamp, stamp))
    return path


def dump(*docs: dict[str, object]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def refs(store: Store) -> set[str]:
    return {str(o.ref) for o in store.snapshot().objects()}


def web(ip: str = "10.96.0.1", name: str = "web", ns: str = "default") -> dict[str, object]:
    return service(name, port("http", 80, 8080), ips=ip, ns=ns)


def web_slice(name: str = "web-1") -> dict[str, object]:
    return eps(name, "web", ep("10.244.1.2"), ports=[eport("http", 8080)])


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def source(tmp_path: Path, store: Store) -> ManifestSource:
    return ManifestSource(str(tmp_path), store, interval=3600)


def test_reads_yaml_json_lists_and_subdirectories(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", "# comment\n---\n" + dump(web(), web_slice()) + "---\n")
    write(tmp_path / "db.json", json.dumps(web("10.96.0.2", name="db")))
    write(tmp_path / "list.yml", dump({
        "apiVersion": "v1",
        "kind": "List",
        "items": [web("10.96.0.3", name="a"), web("10.96.0.4", name="b")],
    }))
    write(tmp_path / "team" / "deep" / "svc.yaml", dump(web("10.96.0.5", name="deep")))
    write(tmp_path / "svclist.yaml", dump({
        "apiVersion": "v1", "kind": "ServiceList", "items": [web("10.96.0.6", name="typed")],
    }))
    write(tmp_path / "cm.yaml", dump({"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": "c"}, "data": {"a": "b"}}))

    report = source.scan()
    assert report.problems == ()
    assert report.files == 6
    assert report.objects == 7
    assert refs(store) == {
        "Service/default/web", "EndpointSlice/default/web-1", "Service/default/db",
        "Service/default/a", "Service/default/b", "Service/default/deep",
        "Service/default/typed",
    }
    assert store.synced


def test_hidden_and_foreign_files_are_skipped(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    write(tmp_path / ".web.yaml.swp.yaml", "not: [valid")  # an editor's swap file
    write(tmp_path / ".git" / "objects.yaml", dump(web("10.96.0.9", name="hidden")))
    write(tmp_path / "README.md", "# not a manifest")
    write(tmp_path / "web.yaml.bak", "garbage: [")
    report = source.scan()
    assert report.problems == () and report.files == 1
    assert refs(store) == {"Service/default/web"}


def test_empty_directory_is_a_complete_empty_view(store: Store, source: ManifestSource) -> None:
    report = source.scan()
    assert (report.files, report.objects, report.problems) == (0, 0, ())
    assert store.synced and refs(store) == set()


def test_edit_is_picked_up_by_the_next_scan(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    path = write(tmp_path / "web.yaml", dump(web("10.96.0.1")))
    source.scan()
    write(path, dump(web("10.96.0.77")))
    source.scan()
    svc = store.snapshot().services[("default", "web")]
    assert [str(ip) for ip in svc.cluster_ips] == ["10.96.0.77"]


def test_unchanged_directory_does_not_wake_anyone(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    path = write(tmp_path / "web.yaml", dump(web()))
    wakes: list[None] = []
    store.subscribe(lambda: wakes.append(None))
    source.scan()
    assert len(wakes) == 1
    source.scan()
    # Rewritten with the same content: re-read, but nothing changed.
    write(path, dump(web()))
    source.scan()
    assert len(wakes) == 1


def test_removing_a_file_removes_its_objects(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", dump(web(), web_slice()))
    other = write(tmp_path / "db.yaml", dump(web("10.96.0.2", name="db")))
    source.scan()
    other.unlink()
    report = source.scan()
    assert refs(store) == {"Service/default/web", "EndpointSlice/default/web-1"}
    assert report.files == 1


def test_malformed_yaml_file_is_reported_and_others_applied(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    write(tmp_path / "broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n")
    report = source.scan()
    assert refs(store) == {"Service/default/web"}
    (problem,) = report.problems
    assert str(tmp_path / "broken.yaml") in problem
    assert "invalid YAML" in problem and "line" in problem
    assert "keeping" not in problem  # it never had good content


def test_malformed_json_file_is_reported(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.json", '{"apiVersion": "v1", "kind": ')
    (problem,) = source.scan().problems
    assert "web.json" in problem and "invalid JSON" in problem
    assert refs(store) == set()


def test_file_that_turns_bad_keeps_its_last_good_objects(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    path = write(tmp_path / "web.yaml", dump(web(), web_slice()))
    source.scan()
    write(path, "apiVersion: v1\nkind: Service\nspec: {ports: [\n")  # a half-written save
    report = source.scan()
    assert refs(store) == {"Service/default/web", "EndpointSlice/default/web-1"}
    (problem,) = report.problems
    assert "web.yaml" in problem and "keeping its previous content" in problem

    # Fixed: the new content applies and the problem is gone.
    write(path, dump(web("10.96.0.8")))
    report = source.scan()
    assert report.problems == ()
    assert refs(store) == {"Service/default/web"}
    assert str(store.snapshot().services[("default", "web")].cluster_ips[0]) == "10.96.0.8"


def test_malformed_object_is_reported_and_the_rest_of_its_file_applied(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    bad = service("bad", port("http", 70000), ips="10.96.0.3")
    write(tmp_path / "mixed.yaml", dump(web(), bad, web_slice()))
    report = source.scan()
    assert refs(store) == {"Service/default/web", "EndpointSlice/default/web-1"}
    (problem,) = report.problems
    where = tmp_path / "mixed.yaml"
    assert problem.startswith(f"{where}: Service/default/bad: spec.ports[0].port: ")


def test_non_object_document_is_reported(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "odd.yaml", "just a string\n---\n" + dump(web()))
    (problem,) = source.scan().problems
    assert "odd.yaml" in problem and "expected an object" in problem
    assert refs(store) == {"Service/default/web"}


def test_same_object_in_two_files_first_path_wins(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "a.yaml", dump(web("10.96.0.1")))
    write(tmp_path / "b.yaml", dump(web("10.96.0.2")))
    report = source.scan()
    (problem,) = report.problems
    assert str(tmp_path / "b.yaml") in problem
    assert str(tmp_path / "a.yaml") in problem
    assert "Service/default/web" in problem
    assert str(store.snapshot().services[("default", "web")].cluster_ips[0]) == "10.96.0.1"
    assert report.objects == 1


def test_same_name_in_other_namespace_is_not_a_duplicate(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "a.yaml", dump(web("10.96.0.1")))
    write(tmp_path / "b.yaml", dump(web("10.96.0.2", ns="other")))
    assert source.scan().problems == ()
    assert refs(store) == {"Service/default/web", "Service/other/web"}


def test_missing_directory(tmp_path: Path, store: Store) -> None:
    with pytest.raises(ManifestError) as info:
        ManifestSource(str(tmp_path / "nope"), store).scan()
    assert "nope" in str(info.value)


def test_parse_file_reports_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(ManifestError) as info:
        parse_file(str(path))
    assert info.value.path == str(path)


def test_start_scans_then_follows_and_stop_joins(tmp_path: Path, store: Store) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    seen: list[set[str]] = []
    second = threading.Event()

    def listener() -> None:
        seen.append(refs(store))
        if len(seen) > 1:
            second.set()

    store.subscribe(listener)
    src = ManifestSource(str(tmp_path), store, interval=0.01)
    src.start()
    try:
        assert seen == [{"Service/default/web"}]  # the first scan is synchronous
        write(tmp_path / "db.yaml", dump(web("10.96.0.2", name="db")))
        assert second.wait(5), "the polling thread did not pick up the new file"
        assert seen[-1] == {"Service/default/web", "Service/default/db"}
    finally:
        src.stop()
    assert "manifests" not in {t.name for t in threading.enumerate()}


def scan_within(source: ManifestSource, seconds: float = 10) -> ScanReport:
    """scan(), failing (not hanging the suite) if it does not end in time."""
    done: list[ScanReport] = []
    thread = threading.Thread(target=lambda: done.append(source.scan()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"scan() still running after {seconds} s"
    return done[0]


@pytest.mark.parametrize(("name", "text", "cause"), [
    ("self.yaml", "&d {apiVersion: v1, kind: List, items: [*d]}\n", "contains itself"),
    ("deep.yaml", "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("big.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: a, generation: %s}\n"
     % ("9" * 5000), "5000 digits"),
    ("big.json", '{"apiVersion": "v1", "kind": "Service", "metadata": {"generation": %s}}'
     % ("9" * 5000), "5000 digits"),
])
def test_a_file_the_parser_chokes_on_is_that_files_problem(
    tmp_path: Path, store: Store, source: ManifestSource, name: str, text: str, cause: str
) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    write(tmp_path / name, text)
    report = source.scan()
    (problem,) = report.problems
    assert problem.startswith(f"{tmp_path / name}: ") and cause in problem
    assert refs(store) == {"Service/default/web"}

    # A file that had good content keeps it, as for a syntax error.
    db = web("10.96.0.2", name="db")
    write(tmp_path / name, json.dumps(db) if name.endswith(".json") else dump(db))
    assert source.scan().problems == ()
    write(tmp_path / name, text)
    (problem,) = source.scan().problems
    assert cause in problem and "keeping its previous content" in problem
    assert refs(store) == {"Service/default/web", "Service/default/db"}


def test_parse_file_turns_any_parser_failure_into_a_manifest_error(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.yaml", "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ManifestError) as info:
        parse_file(str(path))
    assert info.value.path == str(path)


def test_start_survives_a_file_the_parser_chokes_on(tmp_path: Path, store: Store) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    write(tmp_path / "z.yaml", "&d {apiVersion: v1, kind: List, items: [*d]}\n")
    src = ManifestSource(str(tmp_path), store, interval=3600)
    src.start()
    src.stop()
    assert refs(store) == {"Service/default/web"}
    assert len(src.last_report.problems) == 1


def test_a_failed_scan_is_repeated_in_full(
    tmp_path: Path, store: Store, source: ManifestSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "web.yaml", dump(web("10.96.0.1")))
    source.scan()
    write(path, dump(web("10.96.0.22")))

    def broken(*_: object) -> bool:
        raise RuntimeError("store failed")

    with monkeypatch.context() as patch:
        patch.setattr(store, "replace", broken)
        with pytest.raises(RuntimeError):
            source.scan()
    # The next scan must not take web.yaml for applied.
    source.scan()
    svc = store.snapshot().services[("default", "web")]
    assert [str(ip) for ip in svc.cluster_ips] == ["10.96.0.22"]


def test_a_link_back_up_the_tree_reads_each_file_once(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    os.symlink(".", tmp_path / "l1")
    report = scan_within(source)
    assert (report.files, report.objects, report.problems) == (1, 1, ())


def test_two_links_back_up_the_tree_do_not_loop(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    os.symlink(".", tmp_path / "l1")
    os.symlink(".", tmp_path / "l2")
    report = scan_within(source)
    assert (report.files, report.objects, report.problems) == (1, 1, ())


def test_linked_directories_and_files_are_followed_once(
    tmp_path: Path, store: Store
) -> None:
    outside = tmp_path / "volume"
    write(outside / "db.yaml", dump(web("10.96.0.2", name="db")))
    top = tmp_path / "manifests"
    write(top / "web.yaml", dump(web()))
    os.symlink(outside, top / "linked")
    os.symlink(outside, top / "again")
    os.symlink(top / "web.yaml", top / "web-alias.yaml")
    report = scan_within(ManifestSource(str(top), store, interval=3600))
    assert (report.files, report.problems) == (2, ())
    assert refs(store) == {"Service/default/web", "Service/default/db"}


def test_a_fifo_is_reported_not_read(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    write(tmp_path / "web.yaml", dump(web()))
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    try:
        report = scan_within(source, 5)
    finally:
        # Release a scan stuck opening the FIFO for reading (it waits for a
        # writer); ENXIO: nobody is reading it.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    (problem,) = report.problems
    assert problem.startswith(f"{fifo}: ") and "not a regular file" in problem
    assert refs(store) == {"Service/default/web"}


@pytest.mark.parametrize(("written", "text"), [
    ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"),
    ("2024-05-01T12:00:00.5+02:00", "2024-05-01T10:00:00Z"),
    ("2024-05-01 10:00:00", "2024-05-01T10:00:00Z"),  # no zone: YAML says UTC
    ("2024-05-01", "2024-05-01T00:00:00Z"),
])
def test_yaml_creation_timestamp_is_rfc3339_utc(tmp_path: Path, written: str, text: str) -> None:
    path = write(tmp_path / "web.yaml", f"""\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{name: web, creationTimestamp: {written}}}
  spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}
""")
    (svc,), problems = parse_file(str(path))
    assert problems == [] and svc.meta.creation_timestamp == text


def test_older_policy_wins_whether_from_yaml_or_json(
    tmp_path: Path, store: Store, source: ManifestSource
) -> None:
    def policy(name: str, created: str) -> str:
        return (f"apiVersion: veer.dev/v1alpha1\nkind: TrafficPolicy\n"
                f"metadata: {{name: {name}, creationTimestamp: {created}}}\n"
                f"spec: {{targetRefs: [{{name: web}}]}}\n")

    write(tmp_path / "svc.yaml", dump(web()) + "---\n" + policy("newer", "2024-05-01T10:00:00Z"))
    older = yaml.safe_load(policy("older", "'2024-05-01T09:00:00Z'"))
    write(tmp_path / "p.json", json.dumps(older))
    assert source.scan().problems == ()
    (winner,) = policies_in_force(store.snapshot(), ComputeConfig()).values()
    assert winner.meta.name == "older"


def test_a_directory_that_cannot_be_listed_keeps_its_files_objects(
    tmp_path: Path, store: Store, source: ManifestSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an empty directory: its objects stay, reported, until it can be
    listed again (root lists anything, so the refusal is simulated)."""
    write(tmp_path / "web.yaml", dump(web()))
    write(tmp_path / "sub" / "db.yaml", dump(web("10.96.0.2", name="db")))
    assert source.scan().objects == 2
    listing = os.scandir

    def refuse_sub(path: str) -> object:
        if os.fspath(path).endswith(os.sep + "sub"):
            raise PermissionError(13, "Permission denied", path)
        return listing(path)

    monkeypatch.setattr(os, "scandir", refuse_sub)
    report = source.scan()
    assert refs(store) == {"Service/default/web", "Service/default/db"}
    [problem] = report.problems
    assert "sub" in problem and "cannot be listed" in problem and "Permission denied" in problem
    monkeypatch.setattr(os, "scandir", listing)
    (tmp_path / "sub" / "db.yaml").unlink()
    report = source.scan()
    assert refs(store) == {"Service/default/web"} and report.problems == ()


class FakeClocks:
    """The source's two clocks: monotonic seconds, and wall nanoseconds
    (which the files' mtimes are compared with)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 1_800_000_000_000_000_001  # finer than a second (see write())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += int(seconds * 1e9)

    def write(self, path: Path, text: str) -> Path:
        """Write as a writer does now: the file's mtime is the wall clock's."""
        path.write_text(text)
        os.utime(path, ns=(self.wall, self.wall))
        return path


@pytest.fixture
def clocks() -> FakeClocks:
    return FakeClocks()


@pytest.fixture
def settling(tmp_path: Path, store: Store, clocks: FakeClocks) -> ManifestSource:
    return ManifestSource(str(tmp_path), store, interval=3600, settle=0.2,
                          clock=lambda: clocks.now, wall_clock=lambda: clocks.wall)


def test_a_file_cut_short_while_it_is_written_is_not_applied(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource
) -> None:
    full = dump(web("10.96.0.1"), web("10.96.0.2", name="db"))
    path = write(tmp_path / "web.yaml", full)  # an old file: read at once
    views: list[set[str]] = []
    store.subscribe(lambda: views.append(refs(store)))
    assert settling.scan().problems == ()
    assert views == [{"Service/default/web", "Service/default/db"}]

    # Rewritten in place: truncated, then cut short at a document boundary
    # (valid YAML that holds one Service of the two), then whole.
    clocks.write(path, "")
    assert settling.scan().problems == ()
    clocks.advance(0.05)
    clocks.write(path, full.split("---")[0])
    settling.scan()
    clocks.advance(0.1)
    grown = full + "---\n" + dump(web("10.96.0.3", name="api"))
    clocks.write(path, grown)
    settling.scan()
    assert views == [{"Service/default/web", "Service/default/db"}], \
        "a file still being written was applied"

    # Unchanged for the settle time: read.
    clocks.advance(0.2)
    assert settling.scan().problems == ()
    assert views[-1] == {"Service/default/web", "Service/default/db", "Service/default/api"}
    assert len(views) == 2


def test_a_new_file_waits_to_settle_and_a_future_mtime_settles_by_looking(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource
) -> None:
    settling.scan()
    path = clocks.write(tmp_path / "web.yaml", dump(web()))
    settling.scan()
    assert refs(store) == set()
    clocks.advance(0.2)
    settling.scan()
    assert refs(store) == {"Service/default/web"}

    # An mtime ahead of the wall clock (a skewed writer) never looks quiet:
    # the file settles once two looks settle-time apart saw it unchanged.
    ahead = clocks.wall + 3_600_000_000_000
    path.write_text(dump(web(name="db")))
    os.utime(path, ns=(ahead, ahead))
    settling.scan()
    clocks.advance(0.1)
    settling.scan()
    assert refs(store) == {"Service/default/web"}
    clocks.advance(0.1)
    settling.scan()
    assert refs(store) == {"Service/default/db"}


def test_a_file_that_keeps_changing_is_reported_and_keeps_its_content(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource
) -> None:
    path = write(tmp_path / "web.yaml", dump(web()))
    settling.scan()
    for i in range(60):  # 6 s of a rewrite every 0.1 s
        clocks.write(path, dump(web(name=f"w{i}")))
        report = settling.scan()
        clocks.advance(0.1)
    (problem,) = report.problems
    assert problem.startswith(f"{path}: still changing after 5 s")
    assert "keeping its previous content" in problem
    assert refs(store) == {"Service/default/web"}

    clocks.advance(0.2)
    assert settling.scan().problems == ()
    assert refs(store) == {"Service/default/w59"}


def test_a_file_written_to_while_it_is_read_is_read_again(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write(tmp_path / "web.yaml", dump(web("10.96.0.1")))
    settling.scan()
    clocks.write(path, dump(web("10.96.0.2")))
    clocks.advance(0.2)

    real_parse = manifests.parse_file

    def parse_then_a_write_lands(p: str) -> tuple[list[Model], list[str]]:
        result = real_parse(p)
        clocks.write(path, dump(web("10.96.0.3")))
        monkeypatch.setattr(manifests, "parse_file", real_parse)
        return result

    monkeypatch.setattr(manifests, "parse_file", parse_then_a_write_lands)
    settling.scan()
    (svc,) = store.snapshot().objects()
    assert [str(ip) for ip in svc.cluster_ips] == ["10.96.0.1"], \
        "what was read during a write was applied"
    clocks.advance(0.2)
    settling.scan()
    (svc,) = store.snapshot().objects()
    assert [str(ip) for ip in svc.cluster_ips] == ["10.96.0.3"]


def test_start_waits_for_a_file_being_written(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(tmp_path / "db.yaml", dump(web("10.96.0.2", name="db")))
    path = clocks.write(tmp_path / "web.yaml", "")  # just created, its content to come
    views: list[set[str]] = []
    store.subscribe(lambda: views.append(refs(store)))

    def sleep(seconds: float) -> None:
        clocks.advance(min(seconds, 0.05))
        if clocks.now < 1000.12:
            clocks.write(path, dump(web()))  # the writer is still at it

    monkeypatch.setattr(manifests, "time", SimpleNamespace(sleep=sleep))
    settling.start()
    settling.stop()
    assert views == [{"Service/default/web", "Service/default/db"}], \
        "the first view was pushed before it settled"


def test_start_gives_up_waiting_on_a_file_that_keeps_changing(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(tmp_path / "db.yaml", dump(web("10.96.0.2", name="db")))
    path = clocks.write(tmp_path / "web.yaml", "")

    def sleep(seconds: float) -> None:
        clocks.advance(seconds)
        clocks.write(path, dump(web()))

    monkeypatch.setattr(manifests, "time", SimpleNamespace(sleep=sleep))
    started = clocks.now
    settling.start()
    settling.stop()
    assert 2.0 <= clocks.now - started < 2.5
    assert refs(store) == {"Service/default/db"}


def test_a_whole_second_mtime_needs_two_looks(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource
) -> None:
    """A file system that keeps whole seconds rounds the mtime down: a file
    written just now may look most of a second old."""
    settling.scan()
    path = tmp_path / "web.yaml"
    path.write_text(dump(web()))
    rounded = clocks.wall - clocks.wall % 1_000_000_000 - 1_000_000_000
    os.utime(path, ns=(rounded, rounded))
    settling.scan()
    assert refs(store) == set(), "a whole-second mtime was taken for quiet"
    clocks.advance(0.2)
    settling.scan()
    assert refs(store) == {"Service/default/web"}


def test_an_emptied_file_waits_longer(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource
) -> None:
    """`cmd > web.yaml` empties the file before cmd has written anything."""
    path = write(tmp_path / "web.yaml", dump(web()))
    settling.scan()
    clocks.write(path, "")
    for _ in range(19):
        clocks.advance(0.1)
        settling.scan()
    assert refs(store) == {"Service/default/web"}, "an emptied file was read within 2 s"
    clocks.advance(0.1)
    settling.scan()
    assert refs(store) == set(), "a file left empty is empty"


def test_a_first_scan_held_back_keeps_what_it_read(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Files that settle by two looks (an mtime ahead of the clock) in turn,
    while start() holds its first view: each stays settled and read."""
    ahead = clocks.wall + 3_600_000_000_000
    paths = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for i, path in enumerate(paths):
        path.write_text(dump(web(f"10.96.0.{i + 1}", name=f"s{i}")))
        os.utime(path, ns=(ahead + i, ahead + i))
    parsed: list[str] = []
    real_parse = manifests.parse_file

    def counting_parse(p: str) -> tuple[list[Model], list[str]]:
        parsed.append(os.path.basename(p))
        return real_parse(p)

    looks = 0

    def sleep(seconds: float) -> None:
        nonlocal looks
        looks += 1
        clocks.advance(seconds)
        if looks == 1:  # b.yaml is rewritten once: it settles a look after a.yaml
            os.utime(paths[1], ns=(ahead + 7, ahead + 7))

    monkeypatch.setattr(manifests, "parse_file", counting_parse)
    monkeypatch.setattr(manifests, "time", SimpleNamespace(sleep=sleep))
    settling.start()
    settling.stop()
    assert refs(store) == {"Service/default/s0", "Service/default/s1"}
    assert sorted(parsed) == ["a.yaml", "b.yaml"], "a file was read twice"


def test_a_read_that_raced_a_write_reports_no_problem(
    tmp_path: Path, store: Store, clocks: FakeClocks, settling: ManifestSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cut-short read that does not even parse is not the file either."""
    path = write(tmp_path / "web.yaml", dump(web("10.96.0.1")))
    settling.scan()
    clocks.write(path, "apiVersion: v1\nkind: [Serv")
    clocks.advance(0.2)
    real_parse = manifests.parse_file

    def parse_then_the_write_ends(p: str) -> tuple[list[Model], list[str]]:
        try:
            return real_parse(p)
        finally:
            clocks.write(path, dump(web("10.96.0.3")))

    monkeypatch.setattr(manifests, "parse_file", parse_then_the_write_ends)
    assert settling.scan().problems == (), "a cut-short read was reported as the file"
    monkeypatch.setattr(manifests, "parse_file", real_parse)
    clocks.advance(0.2)
    assert settling.scan().problems == ()
    (svc,) = store.snapshot().objects()
    assert [str(ip) for ip in svc.cluster_ips] == ["10.96.0.3"]
