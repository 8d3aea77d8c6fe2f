"""The seccomp filter every sandboxed app runs under: no new user namespaces.

Inside a user namespace of its own an app is root to the kernel's namespaced checks: it may make
network namespaces with nftables, mount filesystems and reach much code that an unprivileged process
never could, the usual first step of a kernel exploit. bwrap's ``--disable-userns`` needs a user
namespace of bwrap's own, which a root bwrap does not make, so a filter refuses ``unshare`` and
``clone`` with ``CLONE_NEWUSER`` (EPERM), and ``clone3`` (ENOSYS: its flags sit in memory a filter
cannot read; glibc then falls back to ``clone``), as Docker's default profile does. Nothing else is
filtered.

The program is classic BPF for ``seccomp(2)``, given to bwrap with ``--seccomp FD``.
"""

from __future__ import annotations

import errno
import platform
import struct

__all__ = ["CLONE_NEWUSER", "userns_filter"]

CLONE_NEWUSER = 0x10000000

# linux/bpf_common.h and linux/seccomp.h
_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_KILL_PROCESS = 0x80000000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (the low half
# of args[0] first on these little-endian machines).
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_X32_BIT = 0x40000000

# (AUDIT_ARCH_*, unshare, clone, clone3) of each ABI a machine's processes may call the kernel with.
_ABIS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "x86_64": ((0xC000003E, 272, 56, 435), (0x40000003, 310, 120, 435)),  # x86-64, i386
    "aarch64": ((0xC00000B7, 97, 220, 435), (0x40000028, 337, 120, 435)),  # arm64, arm
}

_Insn = tuple[int, int | str, int | str, int]


def userns_filter(machine: str | None = None) -> bytes | None:
    """The compiled filter for this machine; None where its system call numbers are not known here."""
    abis = _ABIS.get(machine or platform.machine())
    if abis is None:
        return None
    prog: list[_Insn | str] = [(_LD_W_ABS, 0, 0, _ARCH)]
    prog += [(_JEQ, f"abi{i}", 0, arch) for i, (arch, *_) in enumerate(abis)]
    prog.append((_RET, 0, 0, _KILL_PROCESS))  # an ABI not listed: no call of it is let through
    for i, (arch, unshare, clone, clone3) in enumerate(abis):
        prog += [f"abi{i}", (_LD_W_ABS, 0, 0, _NR)]
        if arch == 0xC000003E:
            # x32 calls (the same arch, numbers with bit 30) have other numbers: none is let through.
            prog.append((_JGE, "enosys", 0, _X32_BIT))
        prog += [
            (_JEQ, "enosys", 0, clone3),
            (_JEQ, "flags", 0, unshare),
            (_JEQ, "flags", "allow", clone),
        ]
    prog += [
        "flags",
        (_LD_W_ABS, 0, 0, _ARG0_LOW),
        (_JSET, "eperm", "allow", CLONE_NEWUSER),
        "allow",
        (_RET, 0, 0, _ALLOW),
        "eperm",
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        "enosys",
        (_RET, 0, 0, _ERRNO | errno.ENOSYS),
    ]
    return _assemble(prog)


def _assemble(prog: list[_Insn | str]) -> bytes:
    """Instructions with labels (strings) as jump targets into ``struct sock_filter`` bytes."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for at, (code, jt, jf, k) in enumerate(insns):
        # Jumps are relative to the next instruction, forward only, at most 255 apart.
        offsets = [labels[j] - at - 1 if isinstance(j, str) else j for j in (jt, jf)]
        assert all(0 <= o <= 255 for o in offsets), (at, jt, jf)
        out += struct.pack("<HBBI", code, offsets[0], offsets[1], k)
    return bytes(out)
