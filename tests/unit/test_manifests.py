"""ManifestSource: a directory of YAML/JSON manifests kept in a Store."""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

import pytest
import yaml
from builders import ep, eport, eps, port, service

from agent.errors import ManifestError
from agent.model.snapshot import Store
from agent.sources.manifests import ManifestSource, parse_file

_mtime = itertools.count(1_700_000_000_000_000_000, 1_000_000_000)


def write(path: Path, text: str) -> Path:
    """Write a file and give it a fresh mtime, so a rewrite is always noticed
    even on file systems with coarse timestamps."""
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
