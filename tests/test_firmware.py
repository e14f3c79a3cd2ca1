"""The generated C on a bare-metal Cortex-M4 (QEMU mps2-an386, semihosting) agrees with the host."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import pfpc

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIRMWARE = os.path.join(ROOT, "examples", "firmware")
M4_FLAGS = "-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16".split()

needs_arm = pytest.mark.skipif(
    not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")),
    reason="arm-none-eabi-gcc or qemu-system-arm missing (.ci/run installs them)",
)


@needs_arm
@pytest.mark.parametrize("example", ["mlp", "lenet"])
def test_cortex_m4_matches_host(tmp_path, example):
    x = np.load(os.path.join(ROOT, "examples", example, "sample.npy"))[:1]
    out = str(tmp_path / "out")
    pfpc.compile(os.path.join(ROOT, "examples", example, "model.onnx"), os.path.join(ROOT, "examples", example, "post.npz"), out_dir=out, batch=1)
    (host_mean, host_var), = pfpc.run_host(out, [x])
    values = ",".join(f"{v:.9e}f" for v in x.reshape(-1))
    (tmp_path / "out" / "input_data.h").write_text(f"static const float pfp_example_input[{x.size}] = {{{values}}};\n")
    elf = str(tmp_path / "fw.elf")
    build = subprocess.run(
        ["arm-none-eabi-gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", *M4_FLAGS, "-fno-math-errno",
         "--specs=rdimon.specs", "-nostartfiles", "-T", os.path.join(FIRMWARE, "cortex_m.ld"), "-I", out,
         os.path.join(FIRMWARE, "startup_cortex_m.c"), os.path.join(FIRMWARE, "main.c"), os.path.join(out, "pfp_model.c"), "-lm", "-o", elf],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run(
        ["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-semihosting-config", "enable=on,target=native", "-kernel", elf],
        capture_output=True, text=True, timeout=120,
    )
    rows = [line.split() for line in run.stdout.splitlines() if " mean " in line]
    assert len(rows) == host_mean.size, run.stdout[-2000:] + run.stderr[-2000:]
    device_mean = np.array([float(r[2]) for r in rows])
    device_var = np.array([float(r[4]) for r in rows])
    np.testing.assert_allclose(device_mean, host_mean.reshape(-1), rtol=1e-5, atol=1e-5 * np.abs(host_mean).max())
    np.testing.assert_allclose(device_var, host_var.reshape(-1), rtol=1e-5, atol=1e-5 * np.abs(host_var).max())


@pytest.mark.parametrize("target", ["host", "arm", "cortex-m4", "cortex-m7", "cortex-m55", "cortex-a53", "cortex-a72", "aarch64"])
def test_generated_makefile_builds_for_target(tmp_path, target):
    from pfpc.codegen.targets import get_target

    out = str(tmp_path / "out")
    pfpc.compile(os.path.join(ROOT, "examples", "lenet", "model.onnx"), os.path.join(ROOT, "examples", "lenet", "post.npz"), out_dir=out, batch=1, target=target)
    cc = get_target(target).cc
    if not shutil.which(cc):
        pytest.skip(f"{cc} not installed")
    result = subprocess.run(["make", "-C", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "libpfp_model.a"))
    if get_target(target).flags:
        assert get_target(target).flags[0] in open(os.path.join(out, "Makefile")).read()


def test_unknown_target_is_a_one_line_error(tmp_path, capsys):
    from pfpc.cli import main

    code = main([os.path.join(ROOT, "examples", "mlp", "model.onnx"), "--batch", "1", "--target", "z80", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown target 'z80'" in err and "cortex-m4" in err and not (tmp_path / "o").exists()
