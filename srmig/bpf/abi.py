"""The XDP program's ABI, read by cffi from the very header the C includes (srmig/ebpf/srmig_abi.h).

Only the region between `BEGIN ABI` and `END ABI` is parsed. tests/test_abi.py checks that cffi's layout
equals the C compiler's and bcc's, so a drift between the two sides fails a test instead of a migration.
"""

from __future__ import annotations

import enum
from pathlib import Path

from cffi import FFI

EBPF_DIR = Path(__file__).resolve().parent.parent / "ebpf"
HEADER = EBPF_DIR / "srmig_abi.h"

_TYPEDEFS = ("typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64; "
             "typedef int32_t __s32;")


def abi_source(header: Path = HEADER) -> str:
    text = header.read_text()
    try:
        body = text.split("/* BEGIN ABI */", 1)[1].split("/* END ABI */", 1)[0]
    except IndexError:
        raise RuntimeError(f"{header}: missing BEGIN ABI / END ABI markers") from None
    return body


ffi = FFI()
ffi.cdef(_TYPEDEFS)
ffi.cdef(abi_source())
_consts = ffi.dlopen(None)  # integer #defines become attributes of any library object

ABI_VERSION: int = _consts.SRMIG_ABI_VERSION
HOLD_SNAPLEN: int = _consts.SRMIG_HOLD_SNAPLEN
PUMP_FRAME_MAX: int = _consts.SRMIG_PUMP_FRAME_MAX
VM_F_HOLD_RING: int = _consts.SRMIG_VM_F_HOLD_RING
VM_F_SHADOW: int = _consts.SRMIG_VM_F_SHADOW
VM_F_RING_FIRST: int = _consts.SRMIG_VM_F_RING_FIRST
VM_F_PARK: int = _consts.SRMIG_VM_F_PARK


def _enum(name: str, ctype: str, prefix: str) -> type[enum.IntEnum]:
    items = sorted(ffi.typeof(ctype).relements.items(), key=lambda kv: kv[1])
    # "*_MAX" is an array size, not a value: it is exported as a number below.
    return enum.IntEnum(name, {k[len(prefix):]: v for k, v in items if not k.endswith("_MAX")})


Behaviour = _enum("Behaviour", "enum srmig_behaviour", "SRMIG_BEH_")
VmState = _enum("VmState", "enum srmig_vm_state", "SRMIG_VM_")
DropReason = _enum("DropReason", "enum srmig_drop_reason", "SRMIG_DROP_")
Verdict = _enum("Verdict", "enum srmig_verdict", "SRMIG_VERDICT_")
META_ABI_VERSION: int = ffi.typeof("enum srmig_meta").relements["SRMIG_META_ABI_VERSION"]
META_NH_GENERATION: int = ffi.typeof("enum srmig_meta").relements["SRMIG_META_NH_GENERATION"]
META_TABLE_GENERATION: int = ffi.typeof("enum srmig_meta").relements["SRMIG_META_TABLE_GENERATION"]
DROP_MAX: int = ffi.typeof("enum srmig_drop_reason").relements["SRMIG_DROP_MAX"]
VERDICT_MAX: int = ffi.typeof("enum srmig_verdict").relements["SRMIG_VERDICT_MAX"]
INNER_IPV6: int = ffi.typeof("enum srmig_inner_family").relements["SRMIG_INNER_IPV6"]
INNER_IPV4: int = ffi.typeof("enum srmig_inner_family").relements["SRMIG_INNER_IPV4"]
INNER_MAX: int = ffi.typeof("enum srmig_inner_family").relements["SRMIG_INNER_MAX"]

# The names operators type and read (RFC 8986 spelling).
BEHAVIOUR_NAMES = {
    Behaviour.END: "End",
    Behaviour.END_DX6_MAP: "End.DX6-map",
    Behaviour.END_S: "End.S",
    Behaviour.END_SBUF: "End.SBUF",
}


def parse_behaviour(text: str) -> Behaviour:
    """'End.S', 'end.s', 'end_s', 'End.DX6-map', 'end.dx6' ... -> Behaviour."""
    norm = text.strip().lower().replace("_", ".").replace("-map", "")
    for beh, name in BEHAVIOUR_NAMES.items():
        if norm == name.lower().replace("-map", ""):
            return beh
    choices = ", ".join(BEHAVIOUR_NAMES.values())
    raise ValueError(f"unknown behaviour {text!r}: expected one of {choices}")


def parse_state(text: str) -> VmState:
    try:
        return VmState[text.strip().upper()]
    except KeyError:
        choices = ", ".join(s.name.lower() for s in VmState)
        raise ValueError(f"unknown VM state {text!r}: expected one of {choices}") from None
