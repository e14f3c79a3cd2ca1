"""Targets: the compiler and flags written into the generated Makefile and CMake files."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PfpcError


@dataclass(frozen=True)
class Target:
    name: str
    cc: str
    flags: tuple
    bare_metal: bool
    description: str


_M_FLAGS = ("-mthumb", "-mfloat-abi=hard")
TARGETS = {
    "host": Target("host", "cc", (), False, "the machine pfpc runs on"),
    "cortex-m4": Target("cortex-m4", "arm-none-eabi-gcc", ("-mcpu=cortex-m4", *_M_FLAGS, "-mfpu=fpv4-sp-d16"), True, "Cortex-M4F, bare metal"),
    "cortex-m7": Target("cortex-m7", "arm-none-eabi-gcc", ("-mcpu=cortex-m7", *_M_FLAGS, "-mfpu=fpv5-d16"), True, "Cortex-M7, bare metal"),
    "cortex-m55": Target("cortex-m55", "arm-none-eabi-gcc", ("-mcpu=cortex-m55", *_M_FLAGS), True, "Cortex-M55 (Helium), bare metal"),
    "cortex-a53": Target("cortex-a53", "aarch64-linux-gnu-gcc", ("-mcpu=cortex-a53",), False, "Cortex-A53, aarch64 Linux"),
    "cortex-a72": Target("cortex-a72", "aarch64-linux-gnu-gcc", ("-mcpu=cortex-a72",), False, "Cortex-A72, aarch64 Linux"),
    "aarch64": Target("aarch64", "aarch64-linux-gnu-gcc", (), False, "generic aarch64 Linux"),
}
TARGETS["arm"] = TARGETS["cortex-m4"]  # the default ARM target


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise PfpcError(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]
