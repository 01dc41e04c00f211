"""The non-memory state of an HVM domain that a migration must carry exactly.

Each blob is kept in the binary form its libxc record body uses (arrays of
the xc structs), so a restore can be checked byte for byte.
"""
from __future__ import annotations

import struct

CPUID_LEAF = struct.Struct("<IIIIII")      # leaf, subleaf, eax, ebx, ecx, edx
MSR_ENTRY = struct.Struct("<IIQ")          # index, flags (zero), value
TSC_INFO = struct.Struct("<IIQII")         # mode, khz, nsec, incarnation, reserved
HVM_PARAM = struct.Struct("<QQ")           # index, value

HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_PAE_ENABLED = 4
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_CONSOLE_PFN = 17

# The libxc stream carries the first five; the device model's state travels in the
# suspend image's Qemu_trad record, written by the toolstack.
BLOBS = ("cpuid_policy", "msr_policy", "tsc_info", "hvm_context", "hvm_params", "device_model")


def synthesize(seed: int, npages: int) -> dict[str, bytes]:
    """Plausible, seed-determined context for a new domain of `npages` pages."""
    import numpy as np

    rng = np.random.default_rng(seed ^ 0x5EED)
    u32 = lambda: int(rng.integers(0, 1 << 32))  # noqa: E731
    cpuid = b"".join(CPUID_LEAF.pack(leaf, 0, u32(), u32(), u32(), u32())
                     for leaf in [*range(0, 0x17), *range(0x80000000, 0x80000009)])
    msr = b"".join(MSR_ENTRY.pack(index, 0, int(rng.integers(0, 1 << 63)))
                   for index in (0xCE, 0x10A, 0x140, 0x48, 0x49, 0xC0000080))
    tsc = TSC_INFO.pack(0, 2_394_000 + int(rng.integers(0, 1000)), int(rng.integers(0, 1 << 48)), 1, 0)
    hvm_context = rng.integers(0, 256, size=4096 + int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
    params = {
        HVM_PARAM_STORE_PFN: npages - 2,
        HVM_PARAM_STORE_EVTCHN: 1 + int(rng.integers(0, 32)),
        HVM_PARAM_PAE_ENABLED: 1,
        HVM_PARAM_IOREQ_PFN: npages - 3,
        HVM_PARAM_BUFIOREQ_PFN: npages - 4,
        HVM_PARAM_CONSOLE_PFN: npages - 1,
    }
    hvm_params = b"".join(HVM_PARAM.pack(k, v) for k, v in sorted(params.items()))
    device_model = b"QEVM" + rng.integers(0, 256, size=16384, dtype=np.uint8).tobytes()
    return {"cpuid_policy": cpuid, "msr_policy": msr, "tsc_info": tsc,
            "hvm_context": hvm_context, "hvm_params": hvm_params, "device_model": device_model}


def hvm_param(hvm_params: bytes, index: int) -> int:
    """Look up one HVM param (0 when absent, as Xen reports an unset one)."""
    for k, v in HVM_PARAM.iter_unpack(hvm_params):
        if k == index:
            return v
    return 0
