"""The C structs in bpf/veer_structs.h and their ctypes mirrors must agree.

A small C program, generated from the mirrors' _fields_ and C_NAME, prints
sizeof and every member's offsetof and size as the C compiler lays them out;
each mirror must match byte for byte. Field lists are also compared by name
with the header's source, so a field added on one side only fails even when
it would fit in the other side's padding.

Needs a C compiler and the kernel's uapi headers (<linux/types.h>, from
linux-libc-dev); skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.datapath.ebpf import structs
from agent.datapath.ebpf.structs import COUNTER_NAMES, MIRRORS

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER = BPF_DIR / "veer_structs.h"
CC = shutil.which("cc")

Layout = dict[str, tuple[int, ...]]


def _header_source() -> str:
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", text)


def _c_struct_fields() -> dict[str, list[str]]:
    """struct name -> member names, in order, from the header's source."""
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", _header_source(), re.DOTALL):
        members = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.search(r"(\w+)\s*(\[[^\]]*\])?$", decl)
            assert m, f"cannot read member {decl!r} of struct {name}"
            members.append(m[1])
        out[name] = members
    return out


def _c_counter_names() -> list[str]:
    m = re.search(r"enum\s+veer_counter\s*\{(.*?)\}\s*;", _header_source(), re.DOTALL)
    assert m, "enum veer_counter not found in the header"
    names = [re.split(r"\s|=", e.strip())[0] for e in m[1].split(",") if e.strip()]
    assert "VEER_CNT_MAX" in names
    return names[: names.index("VEER_CNT_MAX")]


def _program() -> str:
    out = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/types.h>",
        '#include "veer_structs.h"',
        "#define MEMBER_SIZE(type, member) sizeof(((type *)0)->member)",
        "int main(void)",
        "{",
    ]
    for cls in MIRRORS:
        ctype = f"struct {cls.C_NAME}"  # type: ignore[attr-defined]
        out.append(f'\tprintf("{cls.C_NAME} %zu\\n", sizeof({ctype}));')  # type: ignore[attr-defined]
        for field in cls._fields_:
            name = field[0]
            out.append(
                f'\tprintf("{cls.C_NAME}.{name} %zu %zu\\n", '  # type: ignore[attr-defined]
                f"offsetof({ctype}, {name}), MEMBER_SIZE({ctype}, {name}));"
            )
    out += ['\tprintf("VEER_CNT_MAX %d\\n", (int)VEER_CNT_MAX);', "\treturn 0;", "}", ""]
    return "\n".join(out)


def _compile(source: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    assert CC is not None
    src, exe = workdir / "probe.c", workdir / "probe"
    src.write_text(source)
    return subprocess.run(
        [CC, "-std=gnu11", "-Wall", "-Werror", "-I", str(BPF_DIR), "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    if CC is None:
        pytest.skip("no C compiler (cc) on PATH: cannot check the struct mirrors")
    workdir = tmp_path_factory.mktemp("structs")
    uapi = _compile("#include <linux/types.h>\nint main(void) { return 0; }\n", workdir)
    if uapi.returncode != 0:
        pytest.skip(f"kernel uapi headers missing (install linux-libc-dev): {uapi.stderr.strip()}")
    built = _compile(_program(), workdir)
    # Not a skip: a mirror naming a member the C struct lacks fails to compile.
    assert built.returncode == 0, f"the struct probe does not compile:\n{built.stderr}"
    run = subprocess.run(
        [str(workdir / "probe")], capture_output=True, text=True, check=True, timeout=30
    )
    layout: Layout = {}
    for line in run.stdout.splitlines():
        key, *numbers = line.split()
        layout[key] = tuple(int(n) for n in numbers)
    return layout


@pytest.mark.parametrize("cls", MIRRORS, ids=[c.__name__ for c in MIRRORS])
def test_mirror_matches_c_layout(cls: type[ctypes.Structure], c_layout: Layout) -> None:
    c_name: str = cls.C_NAME  # type: ignore[attr-defined]
    assert c_layout[c_name] == (ctypes.sizeof(cls),), f"sizeof(struct {c_name})"
    for field in cls._fields_:
        name = field[0]
        member = getattr(cls, name)
        assert c_layout[f"{c_name}.{name}"] == (member.offset, member.size), (
            f"struct {c_name}.{name}: C (offset, size) vs {cls.__name__}.{name}"
        )


@pytest.mark.parametrize("cls", MIRRORS, ids=[c.__name__ for c in MIRRORS])
def test_mirror_has_the_same_fields_in_the_same_order(cls: type[ctypes.Structure]) -> None:
    c_name: str = cls.C_NAME  # type: ignore[attr-defined]
    c_fields = _c_struct_fields()
    assert c_name in c_fields, f"struct {c_name} is not defined in {HEADER.name}"
    assert [f[0] for f in cls._fields_] == c_fields[c_name]


def test_every_c_struct_is_mirrored() -> None:
    assert set(_c_struct_fields()) == {c.C_NAME for c in MIRRORS}  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", MIRRORS, ids=[c.__name__ for c in MIRRORS])
def test_padding_is_explicit(cls: type[ctypes.Structure], c_layout: Layout) -> None:
    """Hash maps compare keys byte for byte: no hidden padding anywhere."""
    c_name: str = cls.C_NAME  # type: ignore[attr-defined]
    end = 0
    for field in cls._fields_:
        offset, size = c_layout[f"{c_name}.{field[0]}"]
        assert offset == end, f"hidden padding before struct {c_name}.{field[0]}"
        end = offset + size
    assert end == c_layout[c_name][0], f"hidden tail padding in struct {c_name}"


def test_counter_names_match_the_enum(c_layout: Layout) -> None:
    assert c_layout["VEER_CNT_MAX"] == (len(COUNTER_NAMES),)
    assert [n.removeprefix("VEER_CNT_").lower() for n in _c_counter_names()] == list(
        COUNTER_NAMES
    )


@pytest.mark.parametrize("name", ["NAT_CLOSING", "NAT_DSR", "NAT_FIN", "UDP_IDLE_NS",
                                  "TCP_CLOSED_NS", "TCP_HALF_CLOSED_NS"])
def test_nat_aging_constants_match_tc_nat(name: str) -> None:
    """The agent's sweep ages NAT entries as the TC program does."""
    source = (BPF_DIR / "tc_nat.c").read_text()
    m = re.search(rf"#define\s+VEER_{name}\s+(\(1ULL << \d+\)|\d+ULL)", source)
    assert m, f"VEER_{name} not defined in tc_nat.c"
    text = m[1]
    value = 1 << int(text.split("<<")[1].rstrip(") ")) if "<<" in text else int(text[:-3])
    assert getattr(structs, name) == value
