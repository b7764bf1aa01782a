"""The Python side of the ABI must not drift from the C side: cffi's layouts (what userspace reads and
writes) against the C compiler's and against the types bcc derived from the compiled program; cffi's
#define values against the values the compiled programs were built with, read back from the kernel."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from srmig.bpf import abi

STRUCTS = sorted(abi.ffi.list_types()[1])


def _cffi_layout() -> dict[str, int]:
    out = {}
    for name in STRUCTS:
        t = abi.ffi.typeof(f"struct {name}")
        out[f"sizeof {name}"] = abi.ffi.sizeof(t)
        for field, f in t.fields:
            out[f"offsetof {name}.{field}"] = f.offset
    for ename in ("srmig_behaviour", "srmig_vm_state", "srmig_drop_reason", "srmig_verdict", "srmig_meta",
                  "srmig_encap_counter", "srmig_inner_family"):
        for k, v in abi.ffi.typeof(f"enum {ename}").relements.items():
            out[f"enum {k}"] = v
    return out


def _cffi_defines() -> dict[str, int]:
    """Every #define of the ABI region, as cffi read it (the literal in the header)."""
    return {name: getattr(abi._consts, name) for name in re.findall(r"^#define\s+(\w+)\s", abi.abi_source(), re.M)}


def _compile_reporting_defines(tmp_path, source: str, func: str, prog_type: str = "XDP"):
    """`source` compiled and loaded as the loader does (its flags, limits and include path), with one array map
    appended per ABI #define whose size is that define's value in the program: what the compiled program uses after
    its own includes and defines and the loader's -D flags, not the header's text. A constant both sides
    read from one literal cannot disagree; one the program's compile changes can."""
    from srmig.bpf import loader

    src = tmp_path / source  # its own includes resolve through the loader's -I
    src.write_text((abi.EBPF_DIR / source).read_text() +
                   "".join(f"\nBPF_ARRAY(abi_{name}, u32, {name});" for name in _cffi_defines()) + "\n")
    return loader.compile_program(src, func, loader.Limits(), prog_type)


def _check_defines(b) -> None:
    """The sizes the kernel gave those maps (bpf_obj_get_info_by_fd) equal cffi's values."""
    from srmig.bpf import libbpf

    want = _cffi_defines()
    assert {"SRMIG_ABI_VERSION", "SRMIG_HOLD_SNAPLEN", "SRMIG_VM_F_PARK", "SRMIG_ENCAP_SRH_MAX"} <= set(want)
    got = {name: libbpf.map_info(b[f"abi_{name}".encode()].map_fd).max_entries for name in want}
    assert got == want


def test_abi_header_has_structs():
    assert {"srmig_sid_key", "srmig_sid_value", "srmig_vm_key", "srmig_vm_value", "srmig_sid_stats",
            "srmig_hold_record", "srmig_domain_key", "srmig_encap_key", "srmig_encap_value",
            "srmig_encap_vm_stats", "srmig_vm_prefix_key", "srmig_pump_slot", "srmig_pump_mark"} <= set(STRUCTS)


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler (Debian gcc)")
def test_cffi_layout_matches_c_compiler(tmp_path):
    want = _cffi_layout()
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>",
             f'#include "{abi.HEADER}"', "int main(void) {"]
    for key in want:
        kind, name = key.split(" ", 1)
        if kind == "sizeof":
            expr = f"sizeof(struct {name})"
        elif kind == "offsetof":
            s, f = name.split(".")
            expr = f"offsetof(struct {s}, {f})"
        else:
            expr = name
        lines.append(f'printf("%s %ld\\n", "{key}", (long)({expr}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "layout"), str(src)], check=True)
    got = {}
    for line in subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        got[key] = int(value)
    assert got == want


@pytest.mark.bpf
def test_cffi_layout_matches_bcc_maps(tmp_path):
    """bcc derives ctypes key/leaf types from the compiled program: their sizes must equal cffi's. The
    #defines the program was compiled with must equal cffi's too."""
    import ctypes

    b, _ = _compile_reporting_defines(tmp_path, "srmig.c", "srmig_xdp")
    try:
        _check_defines(b)
        pairs = {"sid_table": ("struct srmig_sid_key", "struct srmig_sid_value"),
                 "vm_table": ("struct srmig_vm_key", "struct srmig_vm_value"),
                 "sid_stats": ("uint32_t", "struct srmig_sid_stats"),
                 "sr_domain": ("struct srmig_domain_key", "uint32_t"),
                 "vm_prefixes": ("struct srmig_vm_prefix_key", "struct srmig_vm_key")}
        for name, (key, leaf) in pairs.items():
            table = b[name.encode()]
            assert ctypes.sizeof(table.Key) == abi.ffi.sizeof(key), name
            # per-CPU tables: Leaf is the all-CPUs array, sLeaf one CPU's value
            assert ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)) == abi.ffi.sizeof(leaf), name
        assert ctypes.sizeof(b[b"drop_stats"].sLeaf) == 8
        assert b[b"drop_stats"].max_entries == abi.DROP_MAX
        assert b[b"verdict_stats"].max_entries == abi.VERDICT_MAX
        assert b[b"inner_stats"].max_entries == abi.INNER_MAX * abi.VERDICT_MAX
        assert b[b"meta"].max_entries == abi.ffi.typeof("enum srmig_meta").relements["SRMIG_META_MAX"]
    finally:
        b.cleanup()


@pytest.mark.bpf
def test_cffi_layout_matches_bcc_encap_maps(tmp_path):
    """The same for the ingress's H.Encaps program (tc)."""
    import ctypes

    b, _ = _compile_reporting_defines(tmp_path, "encap.c", "srmig_encap", "SCHED_CLS")
    try:
        _check_defines(b)
        for name, (key, leaf) in {"encap_table": ("struct srmig_encap_key", "struct srmig_encap_value"),
                                  "encap_vm_stats": ("struct srmig_encap_key", "struct srmig_encap_vm_stats"),
                                  "encap_stats": ("uint32_t", "uint64_t"),
                                  "encap_prefixes": ("struct srmig_vm_prefix_key", "struct srmig_encap_key")}.items():
            table = b[name.encode()]
            assert ctypes.sizeof(table.Key) == abi.ffi.sizeof(key), name
            assert ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)) == abi.ffi.sizeof(leaf), name
        assert b[b"encap_stats"].max_entries == abi.ffi.typeof("enum srmig_encap_counter").relements["SRMIG_ENCAP_MAX"]
    finally:
        b.cleanup()
