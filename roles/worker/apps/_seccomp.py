"""The seccomp filter every sandboxed app runs under: no new user namespaces, and none of the kernel
interfaces that are host-wide pools or a kernel exploit's usual ground.

- **User namespaces.** Inside one of its own an app is root to the kernel's namespaced checks: it may
  make network namespaces with nftables, mount filesystems and reach much code that an unprivileged
  process never could, the usual first step of a kernel exploit. bwrap's ``--disable-userns`` needs a
  user namespace of bwrap's own, which a root bwrap does not make, so the filter refuses ``unshare``
  and ``clone`` with ``CLONE_NEWUSER`` (EPERM), and ``clone3`` (ENOSYS: its flags sit in memory a
  filter cannot read; glibc then falls back to ``clone``).
- **Linux AIO** (``io_setup`` and the rest, ENOSYS). Its contexts come from one host-wide pool,
  ``fs.aio-max-nr`` (65,536 events): an app that held them all (64 contexts, within its limits) made
  every other app's and the host's ``io_setup`` fail with EAGAIN for as long as it lived. Runtimes
  without it use threads (glibc's POSIX AIO never calls it; libaio users fall back).
- **io_uring** (ENOSYS): a large share of the kernel exploits of recent years; Docker's default
  profile refuses it too. libuv (Node) falls back to its thread pool.
- **Keyrings, perf events, userfaultfd, bpf** (EPERM), as Docker's default profile refuses them to a
  container without the matching capability: keyrings are not namespaced, and the other three are
  the kernel's attack surface (userfaultfd holds a kernel thread in a fault at a moment the exploit
  chooses) with nothing a web app needs.

Everything else is the kernel's. The program is classic BPF for ``seccomp(2)``, given to bwrap with
``--seccomp FD``.
"""

from __future__ import annotations

import errno
import platform
import struct
from dataclasses import dataclass

__all__ = ["CLONE_NEWUSER", "app_filter"]

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
_X86_64 = 0xC000003E


@dataclass(frozen=True, slots=True)
class _Abi:
    """One ABI's system call numbers (AUDIT_ARCH_* and the kernel's syscall tables)."""

    arch: int
    unshare: int
    clone: int
    enosys: tuple[int, ...]  # clone3, Linux AIO, io_uring
    eperm: tuple[int, ...]  # add_key, request_key, keyctl, perf_event_open, userfaultfd, bpf


_IO_URING = (425, 426, 427)  # setup, enter, register: one number on every ABI
_CLONE3 = 435

# The ABIs a machine's processes may call the kernel with.
_ABIS: dict[str, tuple[_Abi, ...]] = {
    "x86_64": (
        _Abi(_X86_64, 272, 56, (_CLONE3, 206, 207, 208, 209, 210, 333, *_IO_URING), (248, 249, 250, 298, 323, 321)),
        # i386
        _Abi(0x40000003, 310, 120, (_CLONE3, 245, 246, 247, 248, 249, 385, 416, *_IO_URING), (286, 287, 288, 336, 374, 357)),
    ),
    "aarch64": (
        _Abi(0xC00000B7, 97, 220, (_CLONE3, 0, 1, 2, 3, 4, 292, *_IO_URING), (217, 218, 219, 241, 282, 280)),
        # arm (EABI)
        _Abi(0x40000028, 337, 120, (_CLONE3, 243, 244, 245, 246, 247, 399, 416, *_IO_URING), (309, 310, 311, 364, 388, 386)),
    ),
}  # fmt: skip

_Insn = tuple[int, int | str, int | str, int]


def app_filter(machine: str | None = None) -> bytes | None:
    """The compiled filter for this machine; None where its system call numbers are not known here."""
    abis = _ABIS.get(machine or platform.machine())
    if abis is None:
        return None
    prog: list[_Insn | str] = [(_LD_W_ABS, 0, 0, _ARCH)]
    prog += [(_JEQ, f"abi{i}", 0, abi.arch) for i, abi in enumerate(abis)]
    prog.append((_RET, 0, 0, _KILL_PROCESS))  # an ABI not listed: no call of it is let through
    for i, abi in enumerate(abis):
        prog += [f"abi{i}", (_LD_W_ABS, 0, 0, _NR)]
        if abi.arch == _X86_64:
            # x32 calls (the same arch, numbers with bit 30) have other numbers: none is let through.
            prog.append((_JGE, "enosys", 0, _X32_BIT))
        prog += [(_JEQ, "flags", 0, abi.unshare), (_JEQ, "flags", 0, abi.clone)]
        prog += [(_JEQ, "enosys", 0, nr) for nr in abi.enosys]
        prog += [(_JEQ, "eperm", 0, nr) for nr in abi.eperm]
        prog.append((_RET, 0, 0, _ALLOW))
    prog += [
        "flags",
        (_LD_W_ABS, 0, 0, _ARG0_LOW),
        (_JSET, "eperm", 0, CLONE_NEWUSER),
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
