"""The Python side of the ABI must not drift from the C side: cffi's layouts (what userspace reads and
writes) against the C compiler's and against the types bcc derived from the compiled program."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from srmig.dataplane import abi

STRUCTS = sorted(abi.ffi.list_types()[1])


def _cffi_layout() -> dict[str, int]:
    out = {}
    for name in STRUCTS:
        t = abi.ffi.typeof(f"struct {name}")
        out[f"sizeof {name}"] = abi.ffi.sizeof(t)
        for field, f in t.fields:
            out[f"offsetof {name}.{field}"] = f.offset
    for ename in ("srmig_behaviour", "srmig_vm_state", "srmig_drop_reason", "srmig_verdict", "srmig_meta",
                  "srmig_encap_counter"):
        for k, v in abi.ffi.typeof(f"enum {ename}").relements.items():
            out[f"enum {k}"] = v
    for const in ("SRMIG_ABI_VERSION", "SRMIG_HOLD_SNAPLEN", "SRMIG_VM_F_HOLD_RING", "SRMIG_VM_F_SHADOW",
                  "SRMIG_ENCAP_MAX_SEGS", "SRMIG_ENCAP_SRH_MAX"):
        out[f"define {const}"] = getattr(abi._consts, const)
    return out


def test_abi_header_has_structs():
    assert {"srmig_sid_key", "srmig_sid_value", "srmig_vm_key", "srmig_vm_value", "srmig_sid_stats",
            "srmig_hold_record", "srmig_domain_key", "srmig_encap_key", "srmig_encap_value",
            "srmig_encap_vm_stats"} <= set(STRUCTS)


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
def test_cffi_layout_matches_bcc_maps():
    """bcc derives ctypes key/leaf types from the compiled program: their sizes must equal cffi's."""
    import ctypes

    from srmig.dataplane import loader

    b, _ = loader.compile_program(abi.EBPF_DIR / "srmig.c", "srmig_xdp", loader.Limits())
    try:
        pairs = {"sid_table": ("struct srmig_sid_key", "struct srmig_sid_value"),
                 "vm_table": ("struct srmig_vm_key", "struct srmig_vm_value"),
                 "sid_stats": ("uint32_t", "struct srmig_sid_stats"),
                 "sr_domain": ("struct srmig_domain_key", "uint32_t")}
        for name, (key, leaf) in pairs.items():
            table = b[name.encode()]
            assert ctypes.sizeof(table.Key) == abi.ffi.sizeof(key), name
            # per-CPU tables: Leaf is the all-CPUs array, sLeaf one CPU's value
            assert ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)) == abi.ffi.sizeof(leaf), name
        assert ctypes.sizeof(b[b"drop_stats"].sLeaf) == 8
        assert b[b"drop_stats"].max_entries == abi.DROP_MAX
        assert b[b"verdict_stats"].max_entries == abi.VERDICT_MAX
        assert b[b"meta"].max_entries == abi.ffi.typeof("enum srmig_meta").relements["SRMIG_META_MAX"]
    finally:
        b.cleanup()


@pytest.mark.bpf
def test_cffi_layout_matches_bcc_encap_maps():
    """The same for the ingress's H.Encaps program (tc)."""
    import ctypes

    from srmig.dataplane import loader

    b, _ = loader.compile_program(abi.EBPF_DIR / "encap.c", "srmig_encap", loader.Limits(), "SCHED_CLS")
    try:
        for name, (key, leaf) in {"encap_table": ("struct srmig_encap_key", "struct srmig_encap_value"),
                                  "encap_vm_stats": ("struct srmig_encap_key", "struct srmig_encap_vm_stats"),
                                  "encap_stats": ("uint32_t", "uint64_t")}.items():
            table = b[name.encode()]
            assert ctypes.sizeof(table.Key) == abi.ffi.sizeof(key), name
            assert ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)) == abi.ffi.sizeof(leaf), name
        assert b[b"encap_stats"].max_entries == abi.ffi.typeof("enum srmig_encap_counter").relements["SRMIG_ENCAP_MAX"]
    finally:
        b.cleanup()
