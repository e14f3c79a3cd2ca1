"""Targets: the compiler and flags written into the generated Makefile and CMake files, and how
`pfpc run --emulate` runs the result (a QEMU board for Cortex-M, QEMU user mode for aarch64)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PfpcError

FIRMWARE_DIR = os.path.join(os.path.dirname(__file__), "firmware")


@dataclass(frozen=True)
class Target:
    name: str
    cc: str
    flags: tuple
    bare_metal: bool
    description: str
    cpu: str = ""
    qemu_machine: str = ""  # bare metal: the qemu-system-arm board
    linker_script: str = ""  # bare metal: file in FIRMWARE_DIR for that board
    accumulate: str = "channel_rows"  # kernel schedule (codegen.schedule.schedule_kernel): "channel_rows" for application cores, "row" for Helium, "scalar" without SIMD
    qemu_clock_hz: int = 0  # bare metal: the board's processor clock in QEMU, which SysTick counts
    optimise: str = "-O2"  # the generated build's optimisation level (`c_flags`)
    vector_flags: tuple = ()  # flags the generated build adds for this target's vectoriser (`c_flags`)
    gcc_flags: tuple = ()  # flags of gcc alone (clang rejects --param): the Makefile adds them when $(CC) takes them

    def instructions(self, systick_ticks: int) -> int:
        """Instructions executed in ``systick_ticks`` under ``-icount shift=0``: QEMU advances its
        virtual clock 1 ns per instruction and SysTick counts the board's clock (25 MHz on the MPS2
        boards: one tick per 40 instructions), so the count is exact to one tick."""
        return round(systick_ticks * 1e9 / self.qemu_clock_hz)

    @property
    def tool_prefix(self) -> str:
        """'arm-none-eabi-' for arm-none-eabi-gcc: the prefix of ar, size, ... of the same toolchain."""
        return self.cc[: -len("gcc")] if self.cc.endswith("gcc") else ""

    @property
    def cmake_processor(self) -> str:
        return "arm" if self.bare_metal else ("aarch64" if "aarch64" in self.cc else "")

    @property
    def emulator(self) -> str | None:
        """The QEMU binary that runs this target's programs here; None for the host."""
        if self.bare_metal:
            return "qemu-system-arm"
        return "qemu-aarch64" if self.cmake_processor == "aarch64" else None

    def emulator_command(self, program: str, args: list[str]) -> list[str]:
        """How to run ``program args...`` for this target on this machine (directly on the host)."""
        if self.bare_metal:
            semihosting = ",".join(["enable=on,target=native", *(f"arg={a}" for a in [os.path.basename(program), *args])])
            return [self.emulator, "-M", self.qemu_machine, "-nographic", "-icount", "shift=0",
                    "-semihosting-config", semihosting, "-kernel", program]
        if self.emulator:
            cpu = ["-cpu", self.cpu] if self.cpu else []
            return [self.emulator, *cpu, "-L", "/usr/aarch64-linux-gnu", program, *args]
        return [program, *args]


#: Flags of every generated build. ``-std=c99`` alone turns floating-point contraction off (gcc's
#: strict ISO mode): ``-ffp-contract=fast`` gives it back, so that the multiply-accumulate loops
#: compile to fused multiply-adds (``vfma`` on Cortex-M4F/M7, FMA on cores that have it): one
#: instruction and one rounding instead of two per term.
C_FLAGS = ("-std=c99", "-O2", "-fno-math-errno", "-ffp-contract=fast")


def c_flags(target: "Target", portable: bool = False) -> tuple:
    """`C_FLAGS` with the target's optimisation level: -O3 on the host, whose short rows (DS-CNN's
    25x5 maps, depthwise and 1x1 convolutions, a 3x3 window's taps) gcc -O2 leaves scalar: its
    -O2 vectoriser takes no loop that needs a scalar tail. Measured side by side (process CPU
    time, BENCHMARKS.md's models): DS-CNN 0.64x, ResNet-8 0.88x, seed LeNet-5 0.84x, seed MLP
    0.87x, digits MLP 0.92x the -O2 time; the digits LeNet 1.19x (its rows of 8 are unrolled
    instead of vectorised; `HOST_GCC_FLAGS` stops that since session 13). Cortex-M keeps -O2 (no SIMD; -O3 unrolls for code size it does not
    have). Cortex-A (`CORTEX_A_OPTIMISE`) takes -O3 too, measured in instructions under
    qemu-aarch64 (benchmarks/cortex_a.md).

    ``target.vector_flags`` follow (the host: `HOST_VECTOR_FLAGS`), then ``target.gcc_flags``
    (`HOST_GCC_FLAGS`) unless ``portable``: the flags for gcc (the `cc` that pfpc's benchmarks and
    tests build with); ``portable=True``: those every gcc and clang take (the generated Makefile's
    CFLAGS, which adds the gcc flags only when its $(CC) accepts them)."""
    flags = tuple(target.optimise if flag == "-O2" else flag for flag in C_FLAGS) + target.vector_flags
    return flags if portable else flags + target.gcc_flags


#: The host build's `Target.vector_flags`. ``-fno-trapping-math``: a Gaussian ReLU's tail branch
#: (z <= -1.6: a rational function and a division) is an ``if`` in TVM's C; gcc if-converts a
#: branch with a division (computes both arms, then selects) only when floating point may not
#: trap, so with the default ``-ftrapping-math`` those row loops stayed scalar with a branch per
#: element. Selecting after computing both arms gives the same values (nothing here reads the
#: floating-point exception flags). Side by side, process CPU time: ResNet-8 0.94x and DS-CNN 0.94x
#: the time without it (benchmarks/host_kernels.md). Cortex-M keeps the branch (no SIMD: computing
#: both arms would cost instructions).
HOST_VECTOR_FLAGS = ("-fno-trapping-math",)
#: The host build's `Target.gcc_flags`. gcc -O3 completely unrolls a constant-trip loop when its
#: unrolled body stays under ``max-completely-peeled-insns`` (200 of its size estimate). Two kinds
#: of row loops of 8 came in just under it and lost by being unrolled: the digits LeNet's first
#: convolution (2 channels, rows of 8) was unrolled before the loop vectoriser, 9 taps' rows of
#: scalar code (318 mulss, no packed multiply; 90 mulps with the param); ResNet-8's 8x8
#: convolutions (8 channels, rows of 8 = two vectors) were unrolled after it, the block's
#: accumulators kept across the input-channel loop and spilled (883 stack accesses in the largest
#: kernel, 322 with the param). 150 stops both and keeps what is shorter: DS-CNN's pads of
#: 7-column rows and the seed MLP unroll as before (callgrind instructions within 0.1 %; at 50 or
#: 75 DS-CNN took 2-6 % more). Measured in benchmarks/host_kernels.md (session 13). The -O3 it
#: amends stays (gcc -O2 cost the seed MLP 1.3x); clang rejects --param, hence a flag of gcc alone.
HOST_GCC_FLAGS = ("--param=max-completely-peeled-insns=150",)
#: The Cortex-A targets' optimisation level. Instructions per inference at -O3 against -O2, both
#: with -mcpu=cortex-a53 (qemu-aarch64, benchmarks/cortex_a.py): seed LeNet-5 PFP 0.68x and
#: deterministic 0.37x, ResNet-8 0.79x and 0.49x (gcc -O2's very cheap vectoriser cost model leaves
#: the rows that need a scalar tail scalar, as on the host). The host's `HOST_VECTOR_FLAGS` are not
#: added: -fno-trapping-math changed the counts by under 0.5 % either way (the Gaussian ReLUs'
#: tail branch, which it lets gcc if-convert, is not what keeps aarch64's loops scalar). Nor is
#: `HOST_GCC_FLAGS`: with 32 vector registers the complete unrolling costs aarch64 nothing, and the
#: limit made the PFP execute 7.8 % / 5.1 % / 0.3 % more instructions (seed LeNet-5 / ResNet-8 / DS-CNN).
CORTEX_A_OPTIMISE = "-O3"
#: The best flags the compiler offers for the target (benchmarks' second flag set): -O3, loop unrolling,
#: and -march=native on the host (the Cortex-M targets' -mcpu is in their own flags already).
BEST_FLAGS = ("-O3", "-funroll-loops")

_M_FLAGS = ("-mthumb", "-mfloat-abi=hard")
TARGETS = {
    "host": Target("host", "cc", (), False, "the machine pfpc runs on", optimise="-O3",
                   vector_flags=HOST_VECTOR_FLAGS, gcc_flags=HOST_GCC_FLAGS),
    "cortex-m4": Target("cortex-m4", "arm-none-eabi-gcc", ("-mcpu=cortex-m4", *_M_FLAGS, "-mfpu=fpv4-sp-d16"), True,
                        "Cortex-M4F, bare metal", "cortex-m4", "mps2-an386", "mps2.ld", "scalar", 25_000_000),
    "cortex-m7": Target("cortex-m7", "arm-none-eabi-gcc", ("-mcpu=cortex-m7", *_M_FLAGS, "-mfpu=fpv5-d16"), True,
                        "Cortex-M7, bare metal", "cortex-m7", "mps2-an500", "mps2.ld", "scalar", 25_000_000),
    "cortex-m55": Target("cortex-m55", "arm-none-eabi-gcc", ("-mcpu=cortex-m55", *_M_FLAGS), True,
                         "Cortex-M55 (Helium), bare metal", "cortex-m55", "mps3-an547", "mps3_an547.ld", "row", 32_000_000),
    "cortex-a53": Target("cortex-a53", "aarch64-linux-gnu-gcc", ("-mcpu=cortex-a53",), False, "Cortex-A53, aarch64 Linux", "cortex-a53",
                         optimise=CORTEX_A_OPTIMISE),
    "cortex-a72": Target("cortex-a72", "aarch64-linux-gnu-gcc", ("-mcpu=cortex-a72",), False, "Cortex-A72, aarch64 Linux", "cortex-a72",
                         optimise=CORTEX_A_OPTIMISE),
    "aarch64": Target("aarch64", "aarch64-linux-gnu-gcc", (), False, "generic aarch64 Linux", optimise=CORTEX_A_OPTIMISE),
}
TARGETS["arm"] = TARGETS["cortex-m4"]  # the default ARM target


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise PfpcError(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]
