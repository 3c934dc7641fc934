"""Just enough of the API server's structural-schema handling to check
objects against a CRD's openAPIV3Schema without a cluster: validation
(types, required, enum, ranges, lengths, patterns, item counts, list-map
keys, unknown fields) and defaulting.

CEL rules (x-kubernetes-validations) are not evaluated here: the e2e tests
send the same objects to a real kube-apiserver, which evaluates them.
Error paths are written as the API server writes them ("spec.split[1].weight").
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def crd_schema(path: Path, version: str = "v1alpha1") -> dict[str, Any]:
    """The openAPIV3Schema of one version of the CRD in `path`."""
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{path} has no version {version}")


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def errors(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, problem) for everything `value` breaks in `schema`."""
    kind = schema.get("type")
    if kind:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            yield path, f"expected {kind}, got {type(value).__name__}"
            return
    if "enum" in schema and value not in schema["enum"]:
        yield path, f"unsupported value {value!r}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            yield path, "too short"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            yield path, "too long"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            yield path, f"does not match {schema['pattern']}"
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            yield path, f"less than {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            yield path, f"greater than {schema['maximum']}"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            yield path, f"fewer than {schema['minItems']} items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            yield path, f"more than {schema['maxItems']} items"
        keys = schema.get("x-kubernetes-list-map-keys")
        seen: set[tuple[Any, ...]] = set()
        for i, item in enumerate(value):
            yield from errors(schema.get("items", {}), item, f"{path}[{i}]")
            if keys and isinstance(item, dict):
                key = tuple(item.get(k) for k in keys)
                if key in seen:
                    yield f"{path}[{i}]", "duplicate value"
                seen.add(key)
    if isinstance(value, dict):
        props = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                yield _join(path, name), "required value"
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for name in value:
                if name not in props and not (path == "metadata" or path.startswith("metadata.")):
                    yield _join(path, name), "unknown field"
        for name, sub in (props or {}).items():
            if name in value:
                yield from errors(sub, value[name], _join(path, name))


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server stores it."""
    out = copy.deepcopy(value)
    _default(schema, out)
    return out


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
    elif isinstance(value, list):
        for item in value:
            _default(schema.get("items", {}), item)


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, subschema) of a schema, arrays written as path[*]."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, _join(path, name))
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[*]")
