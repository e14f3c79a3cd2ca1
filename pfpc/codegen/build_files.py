"""Build files beside the generated library: the host runner ``<name>_main.c`` (file I/O lives
only there), ``Makefile`` with ``pfpc_target.mk`` (the target's compiler and flags),
``CMakeLists.txt``, a CMake toolchain file for cross targets and, for bare-metal targets, pfpc's
startup code and the board's linker script for the QEMU test program.
"""

from __future__ import annotations

import os

from .program import Program
from .targets import FIRMWARE_DIR, c_flags


def render_build_files(program: Program) -> dict:
    """The runner, Makefile, target flags, CMake files and (bare metal) the firmware files."""
    name = program.name
    files = {f"{name}_main.c": _runner(program), "Makefile": _makefile(name, program.target),
             "pfpc_target.mk": _target_mk(name, program.target), "CMakeLists.txt": _cmake(name, program.target)}
    if program.target.name != "host":
        files["toolchain.cmake"] = _cmake_toolchain(program.target)
    if program.target.bare_metal:
        files.update(_firmware_files(program.target))
    return files


def _runner(program: Program) -> str:
    name, upper = program.name, program.name.upper()
    reads = "\n".join(
        f"    if (fread(in_{c}, sizeof(float), {upper}_{c.upper()}_ELEMENTS, in) != {upper}_{c.upper()}_ELEMENTS) break;" for c, _, _ in program.inputs
    )
    decl = "\n".join(f"  static float in_{c}[{upper}_{c.upper()}_ELEMENTS];" for c, _, _ in program.inputs)
    # every output buffer has the size of its output (an extra output: its own)
    written = [(buffer, program.outputs[index][0] if index is not None else buffer) for buffer, index, _ in program.output_buffers()]
    decl += "".join(f"\n  static float {buffer}[{upper}_{size.upper()}_ELEMENTS];" for buffer, size in written)
    call_args = [f"in_{c}" for c, _, _ in program.inputs] + [buffer for buffer, _ in written] + ["NULL"]
    writes = "\n".join(f"    fwrite({buffer}, sizeof(float), {upper}_{size.upper()}_ELEMENTS, out);" for buffer, size in written)
    steps = len(program.steps) if program.sampling is None else 0
    return f"""/* {name}_main.c: the runner used by `pfpc run`, not part of the library.
 * Reads batches of raw float32 inputs from argv[1] and writes raw means and variances (then the
 * predictive outputs, if any) to argv[2].
 * Built with -DPFPC_CYCLES (the QEMU program for Cortex-M), it prints the SysTick ticks (processor
 * cycles on a board; `pfpc run` converts QEMU's to instructions) and the peak stack (painted and
 * checked, libm included) of every run; with -DPFPC_PROFILE too (library included), the ticks
 * between the counter reads after every kernel of the first run. */
#include <stdio.h>

#include "{name}.h"

#ifdef PFPC_CYCLES
#include <stdint.h>
uint64_t pfpc_systick_ticks(void); /* firmware/startup_cortex_m.c */
void pfpc_stack_paint(void);
uint32_t pfpc_stack_used(void);
#endif
#ifdef PFPC_PROFILE
static uint64_t layer_ticks[{steps} + 1];
void pfpc_layer_done(int step) {{ layer_ticks[step] = pfpc_systick_ticks(); }}
#endif

int main(int argc, char** argv) {{
{decl}
  FILE* in;
  FILE* out;
  long batches = 0;
  if (argc != 3) {{
    fprintf(stderr, "usage: %s input.f32 output.f32\\n", argv[0]);
    return 2;
  }}
  in = fopen(argv[1], "rb");
  out = fopen(argv[2], "wb");
  if (!in || !out) {{
    fprintf(stderr, "cannot open files\\n");
    return 2;
  }}
  for (;;) {{
{reads}
#ifdef PFPC_CYCLES
    {{
      uint64_t start, cycles;
      unsigned long stack;
      pfpc_stack_paint();
      start = pfpc_systick_ticks();
      {name}_run({", ".join(call_args)});
      cycles = pfpc_systick_ticks() - start;
      stack = (unsigned long)pfpc_stack_used(); /* before printf's own frames */
      printf("pfpc cycles %lu\\n", (unsigned long)cycles);
      printf("pfpc stack %lu\\n", stack);
#ifdef PFPC_PROFILE
      if (batches == 0) {{
        int step;
        for (step = 1; step <= {steps}; ++step)
          printf("pfpc layer %d %lu\\n", step - 1, (unsigned long)(layer_ticks[step] - layer_ticks[step - 1]));
      }}
#endif
    }}
#else
    {name}_run({", ".join(call_args)});
#endif
{writes}
    batches++;
  }}
  fclose(in);
  fclose(out);
  return batches > 0 ? 0 : 1;
}}
"""


def _target_mk(name: str, target) -> str:
    ar = f"{target.tool_prefix}ar" if target.tool_prefix else "ar"
    lines = [
        f"# pfpc_target.mk: toolchain and flags for target {target.name} ({target.description}).",
        "# Included by the Makefile beside it; firmware projects may include it too.",
        f"CC = {target.cc}",
        f"AR = {ar}",
        f"TARGET_FLAGS = {' '.join(target.flags)}",
        "# ARCH: the instruction set of the machine that runs the library, e.g. `make ARCH=-march=native`",
        "# (empty: the compiler's default, portable to every machine of the target's architecture)",
        "ARCH =",
        f"CFLAGS = {' '.join(c_flags(target, portable=True))} -Wall -Wextra -Werror -fstack-usage $(TARGET_FLAGS) $(ARCH)",
        "LDLIBS = -lm",
    ]
    if target.gcc_flags:
        gcc_flags = " ".join(target.gcc_flags)
        lines += ["# gcc's own flags (targets.HOST_GCC_FLAGS; clang rejects --param): added when $(CC) accepts them",
                  f"GCC_FLAGS := $(shell $(CC) {gcc_flags} -Werror -E -x c /dev/null >/dev/null 2>&1 && echo {gcc_flags})",
                  "CFLAGS += $(GCC_FLAGS)"]
    if target.bare_metal:
        lines += ["# QEMU board and linker script of the test program (firmware/)",
                  f"QEMU_MACHINE = {target.qemu_machine}", f"LINKER_SCRIPT = firmware/{target.linker_script}"]
    return "\n".join(lines) + "\n"


def _makefile(name: str, target) -> str:
    runner = "" if target.bare_metal else f" {name}_main"
    qemu = ""
    if target.bare_metal:
        qemu = f"""
# The runner as a bare-metal program for QEMU (`pfpc run --emulate`): pfpc's startup code
# (semihosting file I/O, SysTick tick counter) and the board's linker script, in firmware/.
{name}_qemu.elf: {name}_main.c firmware/startup_cortex_m.c $(LINKER_SCRIPT) lib{name}.a
\t$(CC) $(CFLAGS) -DPFPC_CYCLES --specs=rdimon.specs -nostartfiles -T $(LINKER_SCRIPT) \\
\t\t{name}_main.c firmware/startup_cortex_m.c lib{name}.a $(LDLIBS) -o $@

# The same with a counter read after every kernel (`pfpc run --emulate --profile`).
{name}_profile.elf: {name}_main.c {name}.c {name}.h {name}_weights.h firmware/startup_cortex_m.c $(LINKER_SCRIPT)
\t$(CC) $(CFLAGS) -DPFPC_CYCLES -DPFPC_PROFILE --specs=rdimon.specs -nostartfiles -T $(LINKER_SCRIPT) \\
\t\t{name}_main.c {name}.c firmware/startup_cortex_m.c $(LDLIBS) -o $@
"""
    return f"""# Generated by pfpc for target {target.name} ({target.description}).
# `make` builds lib{name}.a{" and the runner " + name + "_main" if runner else ""}; `make CC=... TARGET_FLAGS=...` overrides the toolchain.
include pfpc_target.mk

all: lib{name}.a{runner}

{name}.o: {name}.c {name}.h {name}_weights.h
\t$(CC) $(CFLAGS) -c {name}.c -o $@

lib{name}.a: {name}.o
\t$(AR) rcs $@ $^

{name}_main: {name}_main.c lib{name}.a
\t$(CC) $(CFLAGS) {name}_main.c lib{name}.a $(LDLIBS) -o $@
{qemu}
clean:
\trm -f {name}.o lib{name}.a {name}_main {name}_qemu.elf {name}_profile.elf *.su

.PHONY: all clean
"""


def _cmake(name: str, target) -> str:
    return f"""# Generated by pfpc. add_subdirectory() this folder and link {name}; for a cross build,
# configure with -DCMAKE_TOOLCHAIN_FILE=<this folder>/toolchain.cmake.
# The library builds with the Makefile's flags (pfpc_target.mk: {target.optimise} -fno-math-errno{''.join(' ' + f for f in target.vector_flags)}, C99) in every
# configuration but Debug, also when no CMAKE_BUILD_TYPE is given (CMake's default would be -O0).
cmake_minimum_required(VERSION 3.13)
project({name} C)
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES AND CMAKE_SOURCE_DIR STREQUAL CMAKE_CURRENT_SOURCE_DIR)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type (pfpc default: Release)" FORCE)
endif()
add_library({name} STATIC {name}.c)
target_include_directories({name} PUBLIC ${{CMAKE_CURRENT_SOURCE_DIR}})
set_target_properties({name} PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  # last on the command line, so {target.optimise} also replaces Release's -O3
  target_compile_options({name} PRIVATE -fno-math-errno -ffp-contract=fast{''.join(' ' + f for f in target.vector_flags)} $<$<NOT:$<CONFIG:Debug>>:{target.optimise}>)
endif(){_cmake_gcc_flags(name, target)}
# the Makefile's ARCH, e.g. -DPFPC_ARCH=-march=native (empty: portable)
set(PFPC_ARCH "" CACHE STRING "instruction-set flags for the machine that runs {name}, e.g. -march=native")
if(PFPC_ARCH)
  separate_arguments(pfpc_arch_flags UNIX_COMMAND "${{PFPC_ARCH}}")
  target_compile_options({name} PRIVATE ${{pfpc_arch_flags}})
endif()
if(NOT MSVC)
  target_link_libraries({name} PUBLIC m)
endif()
"""


def _cmake_gcc_flags(name: str, target) -> str:
    """The CMake lines adding ``target.gcc_flags`` under gcc alone, as the Makefile does."""
    if not target.gcc_flags:
        return ""
    return (f"\n# gcc's own flags (the Makefile's GCC_FLAGS; clang rejects --param)\n"
            f"target_compile_options({name} PRIVATE $<$<AND:$<C_COMPILER_ID:GNU>,$<NOT:$<CONFIG:Debug>>>:{' '.join(target.gcc_flags)}>)")


def _cmake_toolchain(target) -> str:
    system = "Generic" if target.bare_metal else "Linux"
    lines = [
        f"# CMake toolchain file generated by pfpc for target {target.name} ({target.description}).",
        f"set(CMAKE_SYSTEM_NAME {system})",
        f"set(CMAKE_SYSTEM_PROCESSOR {target.cmake_processor})",
        f"set(CMAKE_C_COMPILER {target.cc})",
        f'set(CMAKE_C_FLAGS_INIT "{" ".join(target.flags)}")',
    ]
    if target.bare_metal:
        lines.append("# no operating system to link a test program against")
        lines.append("set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)")
    lines.append("set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)")
    return "\n".join(lines) + "\n"


def _firmware_files(target) -> dict:
    """pfpc's Cortex-M startup and the board's linker script, for the QEMU test program."""
    files = {}
    for file_name in ("startup_cortex_m.c", target.linker_script):
        with open(os.path.join(FIRMWARE_DIR, file_name)) as handle:
            files[f"firmware/{file_name}"] = handle.read()
    return files
