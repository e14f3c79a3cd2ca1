"""The generated C on its targets: Cortex-M under qemu-system-arm, aarch64 under qemu-aarch64, the
firmware example, CMake cross builds, C++, and the footprint report against the size tool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import onnx
import pytest

import pfpc
import pfpc.compiler as compiler
import reference
from pfpc.cli import main
from pfpc.codegen.targets import get_target

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLES = os.path.join(ROOT, "examples")


def _example(name):
    return os.path.join(EXAMPLES, name, "model.onnx"), os.path.join(EXAMPLES, name, "post.npz")


def _needs(*tools):
    missing = [tool for tool in tools if not shutil.which(tool)]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} missing (.ci/run installs them)")


needs_arm = _needs("arm-none-eabi-gcc", "qemu-system-arm")
EMULATED = {
    "cortex-m4": needs_arm,
    "cortex-m7": needs_arm,
    "cortex-m55": needs_arm,
    "aarch64": _needs("aarch64-linux-gnu-gcc", "qemu-aarch64"),
}


@pytest.mark.parametrize("target,example", [
    pytest.param(t, e, marks=EMULATED[t]) for t, e in
    [("cortex-m4", "mlp"), ("cortex-m4", "lenet"), ("cortex-m7", "mlp"), ("cortex-m7", "lenet"), ("cortex-m55", "lenet"),
     ("aarch64", "mlp"), ("aarch64", "lenet")]
])
def test_emulated_target_matches_host_and_reference(tmp_path, target, example):
    model_path, post_path = _example(example)
    x = np.load(os.path.join(EXAMPLES, example, "sample.npy"))
    out = str(tmp_path / "out")
    pfpc.compile(model_path, post_path, out_dir=out, batch=1, target=target)
    device = compiler.run(out, [x], emulate=True)
    host = compiler.run(out, [x])
    (device_mean, device_var), = device.outputs
    (host_mean, host_var), = host.outputs
    np.testing.assert_allclose(device_mean, host_mean, rtol=1e-5, atol=1e-5 * np.abs(host_mean).max())
    np.testing.assert_allclose(device_var, host_var, rtol=1e-5, atol=1e-5 * np.abs(host_var).max())
    post = dict(np.load(post_path))
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in post.items()}
    ref_mean, ref_var = reference.pfp_onnx(onnx.load(model_path), variances, {"input": x})["logits"]
    np.testing.assert_allclose(device_mean, ref_mean, rtol=1e-4, atol=1e-4 * np.abs(ref_mean).max())
    np.testing.assert_allclose(device_var, ref_var, rtol=1e-4, atol=1e-4 * np.abs(ref_var).max())
    if get_target(target).bare_metal:
        assert len(device.cycles) == x.shape[0] and min(device.cycles) > 0
    else:
        assert device.cycles == []


@pytest.mark.parametrize("target", [pytest.param(t, marks=EMULATED[t]) for t in ("cortex-m4", "cortex-m55", "aarch64")])
def test_deterministic_network_on_target_equals_onnxruntime(tmp_path, target):
    """The deterministic LeNet (no posterior: the network SVI-C runs per sample and the benchmarks'
    baseline) on each schedule: scalar (Cortex-M4, unrolled windows) and row (M55, aarch64)."""
    import onnxruntime as ort

    model_path, _ = _example("lenet")
    x = np.load(os.path.join(EXAMPLES, "lenet", "sample.npy"))
    out = str(tmp_path / "det")
    pfpc.compile(model_path, None, out_dir=out, batch=1, target=target)
    (mean, var), = compiler.run(out, [x], emulate=True).outputs
    expected = ort.InferenceSession(model_path).run(None, {"input": x})[0]
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not var.any()


@needs_arm
def test_cycle_counts_are_deterministic_and_track_work(tmp_path, capsys):
    x_path = os.path.join(EXAMPLES, "mlp", "sample.npy")
    counts = {}
    for example in ("mlp", "lenet"):
        out = str(tmp_path / example)
        pfpc.compile(*_example(example), out_dir=out, batch=1, target="cortex-m4")
        first = compiler.run(out, [np.load(os.path.join(EXAMPLES, example, "sample.npy"))], emulate=True).cycles
        second = compiler.run(out, [np.load(os.path.join(EXAMPLES, example, "sample.npy"))], emulate=True).cycles
        assert first == second
        counts[example] = np.median(first)
        # every PFP multiply-add is at least one instruction (raw SysTick ticks, 1 per 40, are not)
        layers = json.loads(open(os.path.join(out, "pfpc.json")).read())["layers"]
        assert counts[example] > sum(layer["pfp_fma"] for layer in layers)
    # LeNet does about 3x the MACs of the MLP (55k vs 15k PFP multiply-adds) plus the Clark maxima
    assert counts["lenet"] > 2 * counts["mlp"]
    assert main(["run", str(tmp_path / "mlp"), "--input", x_path, "--output", str(tmp_path / "y.npz"), "--emulate", "--cycles"]) == 0
    assert f"median {int(counts['mlp'])}" in capsys.readouterr().out


@needs_arm
def test_painted_stack_covers_the_static_bound(tmp_path):
    """The stack measured on the device (painted before the call, checked after) agrees with the
    -fstack-usage bound of the report (the executor's frame plus the deepest kernel's: every kernel
    runs) to a few words from below (the painted top is the caller's stack pointer at the paint
    call), and exceeds it by no more than libm's frames and one SysTick exception frame."""
    for example in ("mlp", "lenet"):
        out = str(tmp_path / example)
        result = pfpc.compile(*_example(example), out_dir=out, batch=1, target="cortex-m4", measure=True)
        static_bound = result.footprint["stack_bytes"]
        measured = compiler.run(out, [np.load(os.path.join(EXAMPLES, example, "sample.npy"))], emulate=True).stack_bytes
        assert len(measured) == 4 and len(set(measured)) == 1, measured
        assert static_bound - 16 <= measured[0] <= static_bound + 512, (example, static_bound, measured)


def test_cycles_need_an_emulated_cortex_m(tmp_path, capsys):
    out = str(tmp_path / "out")
    pfpc.compile(*_example("mlp"), out_dir=out, batch=1)
    x_path = os.path.join(EXAMPLES, "mlp", "sample.npy")
    assert main(["run", out, "--input", x_path, "--output", str(tmp_path / "y.npz"), "--cycles"]) == 2
    assert main(["run", out, "--input", x_path, "--output", str(tmp_path / "y.npz"), "--emulate", "--cycles"]) == 2
    err = capsys.readouterr().err
    assert "--cycles needs --emulate" in err and "needs a Cortex-M target (compiled for host)" in err


@needs_arm
def test_firmware_example_runs_under_qemu(tmp_path):
    out = str(tmp_path / "lenet_m4")
    pfpc.compile(*_example("lenet"), out_dir=out, batch=1, target="cortex-m4", outputs=("probs", "entropy"))
    samples = os.path.join(EXAMPLES, "lenet", "sample.npy")
    subprocess.run(["python3", os.path.join(EXAMPLES, "firmware", "make_input.py"), samples, os.path.join(out, "input_data.h")], check=True)
    run = subprocess.run(["make", "-s", "-C", os.path.join(EXAMPLES, "firmware"), f"OUT={out}", "run"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if " mean " in line]
    (host_mean, host_var), = pfpc.run_host(out, [np.load(samples)[:1]])
    assert len(rows) == host_mean.size, run.stdout[-2000:]
    np.testing.assert_allclose([float(r[2]) for r in rows], host_mean.reshape(-1), rtol=1e-5, atol=1e-5 * np.abs(host_mean).max())
    np.testing.assert_allclose([float(r[4]) for r in rows], host_var.reshape(-1), rtol=1e-5, atol=1e-5 * np.abs(host_var).max())
    # the decision line: the library's mean-field probabilities and entropy, against a float64 NumPy
    # mean-field of the host build's moments, and the sample's label
    (decision,) = [line.split() for line in run.stdout.splitlines() if line.startswith("class ")]
    m, v = host_mean.reshape(-1).astype(np.float64), host_var.reshape(-1).astype(np.float64)
    q = 1.0 / np.exp(-(m[:, None] - m[None, :]) / np.sqrt(1.0 + np.pi * v[:, None] / 8.0)).sum(axis=1)
    p = q / q.sum()
    entropy = -np.sum(p * np.log(p))
    label = int(np.load(os.path.join(EXAMPLES, "lenet", "sample_labels.npy"))[0])
    assert int(decision[1]) == int(np.argmax(p)) == label, decision
    np.testing.assert_allclose(float(decision[3]), p.max(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(decision[5]), entropy, rtol=1e-4, atol=1e-6)
    assert decision[6] == ("accept" if entropy <= 0.5 else "abstain")


@pytest.mark.parametrize("target", ["host", "arm", "cortex-m4", "cortex-m7", "cortex-m55", "cortex-a53", "cortex-a72", "aarch64"])
def test_generated_makefile_builds_for_target(tmp_path, target):
    out = str(tmp_path / "out")
    pfpc.compile(*_example("lenet"), out_dir=out, batch=1, target=target)
    cc = get_target(target).cc
    if not shutil.which(cc):
        pytest.skip(f"{cc} not installed")
    result = subprocess.run(["make", "-C", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "libpfp_model.a"))
    for flag in get_target(target).flags:
        assert flag in result.stdout


@pytest.mark.parametrize("target", [pytest.param("cortex-m4", marks=needs_arm), pytest.param("aarch64", marks=_needs("aarch64-linux-gnu-gcc"))])
def test_cmake_toolchain_file_cross_builds(tmp_path, target):
    if not shutil.which("cmake"):
        pytest.skip("cmake missing")
    out = str(tmp_path / "out")
    pfpc.compile(*_example("mlp"), out_dir=out, batch=1, target=target)
    build = str(tmp_path / "build")
    configure = subprocess.run(["cmake", "-S", out, "-B", build, f"-DCMAKE_TOOLCHAIN_FILE={out}/toolchain.cmake"], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr[-2000:]
    made = subprocess.run(["cmake", "--build", build, "--verbose"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert get_target(target).cc in made.stdout
    for flag in get_target(target).flags:
        assert flag in made.stdout
    assert os.path.exists(os.path.join(build, "libpfp_model.a"))


@pytest.mark.skipif(not shutil.which("g++"), reason="g++ missing")
def test_header_is_usable_from_cpp(tmp_path):
    out = str(tmp_path / "out")
    pfpc.compile(*_example("mlp"), out_dir=out, batch=1)
    (tmp_path / "use.cpp").write_text(
        '#include "pfp_model.h"\nstatic float x[PFP_MODEL_INPUT0_SIZE], m[PFP_MODEL_OUTPUT0_SIZE], v[PFP_MODEL_OUTPUT0_SIZE];\n'
        "int main() { return pfp_model_run(x, m, v, nullptr); }\n"
    )
    subprocess.run(["cc", "-std=c99", "-O1", "-c", os.path.join(out, "pfp_model.c"), "-o", str(tmp_path / "lib.o")], check=True)
    result = subprocess.run(["g++", "-Wall", "-Werror", "-I", out, str(tmp_path / "use.cpp"), str(tmp_path / "lib.o"), "-lm", "-o", str(tmp_path / "use")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert subprocess.run([str(tmp_path / "use")]).returncode == 0


def _size_sections(tool, path):
    """Independent parse of ``size -A``: {section: bytes}."""
    lines = subprocess.run([tool, "-A", path], capture_output=True, text=True, check=True).stdout.splitlines()
    return {parts[0]: int(parts[1]) for parts in (line.split() for line in lines) if len(parts) == 3 and parts[0].startswith(".")}


@needs_arm
def test_report_matches_the_size_tool(tmp_path, capsys):
    out = str(tmp_path / "out")
    result = pfpc.compile(*_example("lenet"), out_dir=out, batch=1, target="cortex-m4")
    assert main(["report", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    subprocess.run(["make", "-s", "-C", out, "pfp_model.o"], check=True)
    sections = _size_sections("arm-none-eabi-size", os.path.join(out, "pfp_model.o"))
    assert report["code_bytes"] == sections[".text"]
    assert report["weights_bytes"] == sum(v for k, v in sections.items() if k.startswith(".rodata"))
    assert report["arena_bytes"] == sections[".bss"] == result.program.arena_size
    # the weights section holds the posterior arrays (mean and moment per weight), little else
    arrays = 4 * sum(values.size for values, _ in result.program.weights.values())
    assert arrays <= report["weights_bytes"] < arrays + 1024
    su = open(os.path.join(out, "pfp_model.su")).read()
    run_frame = int(next(line for line in su.splitlines() if ":pfp_model_run\t" in line).split("\t")[1])
    assert report["stack_bytes"] >= run_frame > 0
    assert report["flash_bytes"] == report["weights_bytes"] + report["code_bytes"] + report["data_bytes"]
    # per-layer arithmetic against the ONNX graph: Conv MACs = out elements * Cin*kh*kw, Gemm = out * K
    model = onnx.shape_inference.infer_shapes(onnx.load(_example("lenet")[0]))
    weights = {init.name: init.dims for init in model.graph.initializer}
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim][1:] for info in model.graph.value_info}
    expected = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            cout, cin, kh, kw = weights[node.input[1]]
            expected.append(int(np.prod(shapes[node.output[0]])) * cin * kh * kw)
        elif node.op_type in ("Gemm", "MatMul"):
            expected.append(int(np.prod(weights[node.input[1]])))
    assert [layer["macs"] for layer in report["layers"] if layer["macs"]] == expected


def test_limits_fail_the_compile_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    args = [_example("mlp")[0], "--posterior", _example("mlp")[1], "--batch", "1", "-o", str(out)]
    assert main(args + ["--flash-limit", "16K"]) == 2
    err = capsys.readouterr().err
    assert "bytes of flash" in err and "more than the limit of 16384 bytes" in err and err.count("\n") == 1
    assert main(args + ["--ram-limit", "256"]) == 2
    assert "bytes of RAM" in capsys.readouterr().err
    assert main(args + ["--ram-limit", "lots"]) == 2
    assert "--ram-limit: 'lots' is not a size" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".pfpc")]
    assert main(args + ["--ram-limit", "64K", "--flash-limit", "1M"]) == 0
    printed = capsys.readouterr().out
    assert "flash" in printed and "k_fc1_Gemm_relu1_Relu" in printed and out.exists()  # the layer by its C function


def test_unknown_target_is_a_one_line_error(tmp_path, capsys):
    code = main([_example("mlp")[0], "--batch", "1", "--target", "z80", "-o", str(tmp_path / "o"), "--deterministic"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown target 'z80'" in err and "cortex-m4" in err and not (tmp_path / "o").exists()


def test_report_counts_gaussian_ops_only_with_a_posterior():
    """ReLU moments and Clark maxima are counted where the kernel propagates a variance: the
    deterministic network has the same MACs and none of them."""
    from pfpc.codegen.footprint import layer_costs

    pfp = layer_costs(pfpc.compile(*_example("lenet"), batch=1).program)
    det = layer_costs(pfpc.compile(_example("lenet")[0], None, batch=1).program)
    assert [layer["macs"] for layer in pfp] == [layer["macs"] for layer in det]
    assert all(not layer["gaussian_ops"] for layer in det)
    # LeNet: ReLU after pool1 (6x4x4; computed after the pool, `pool_before_relu`), pool2 (16x2x2) and
    # fc1 (32); 3 Clark steps per 2x2 window of both pools
    assert sum(layer["gaussian_ops"].get("relu", 0) for layer in pfp) == 6 * 16 + 16 * 4 + 32
    assert sum(layer["gaussian_ops"].get("max", 0) for layer in pfp) == 3 * (6 * 16 + 16 * 4)


def _traced_instructions(out_dir):
    """Instructions executed between the two SysTick reads around one call, counted by QEMU
    itself: one translation block per instruction (-singlestep), each logged when it runs."""
    target = compiler.get_target(compiler.read_metadata(out_dir)["target"])
    elf = os.path.join(out_dir, "pfp_model_qemu.elf")
    x = np.load(os.path.join(EXAMPLES, "mlp", "sample.npy"))[:1].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        x.tofile(os.path.join(tmp, "in.f32"))
        command = target.emulator_command(elf, ["in.f32", "out.f32"])
        command[1:1] = ["-singlestep", "-d", "exec,nochain", "-D", "trace.log"]
        subprocess.run(command, cwd=tmp, check=True, capture_output=True, timeout=600)
        names = [line.split()[-1] for line in open(os.path.join(tmp, "trace.log")) if line.startswith("Trace")]
    reads = [i for i, name in enumerate(names) if name == "pfpc_systick_ticks" and names[i - 1] != "pfpc_systick_ticks"]
    ends = [i for i, name in enumerate(names) if name == "pfpc_systick_ticks" and names[i + 1] != "pfpc_systick_ticks"]
    return reads[1] - ends[0] - 1


@needs_arm
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_cycles_are_the_instructions_qemu_executes(tmp_path, target):
    """The cycle count of a call equals the instructions QEMU executes between the two counter
    reads around it, counted independently from QEMU's execution trace, to one SysTick period
    (40 instructions on the MPS2 board, 31.25 on the MPS3)."""
    out = str(tmp_path / "mlp")
    pfpc.compile(*_example("mlp"), out_dir=out, batch=1, target=target)
    cycles = compiler.run(out, [np.load(os.path.join(EXAMPLES, "mlp", "sample.npy"))[:1]], emulate=True).cycles[0]
    traced = _traced_instructions(out)
    assert abs(cycles - traced) <= 1e9 / compiler.get_target(target).qemu_clock_hz, (cycles, traced)


@pytest.mark.parametrize("target", [pytest.param("cortex-m4", marks=needs_arm), pytest.param("cortex-m7", marks=needs_arm)])
def test_cortex_m_object_uses_fused_multiply_adds(tmp_path, target):
    """The generated Makefile's flags let gcc contract a*b + c into one vfma: under -std=c99 alone
    (strict ISO C) it emits none and every multiply-accumulate costs a vmul and a vadd."""
    if not shutil.which("arm-none-eabi-objdump"):
        pytest.skip("arm-none-eabi-objdump missing")
    out = str(tmp_path / "out")
    pfpc.compile(*_example("lenet"), out_dir=out, batch=1, target=target)
    subprocess.run(["make", "-s", "-C", out, "pfp_model.o"], check=True)
    disassembly = subprocess.run(["arm-none-eabi-objdump", "-d", os.path.join(out, "pfp_model.o")], capture_output=True, text=True, check=True).stdout
    fused = [line for line in disassembly.splitlines() if "\tvfma" in line or "\tvfms" in line or "\tvfnm" in line]
    multiplies = [line for line in disassembly.splitlines() if "\tvmul.f32" in line]
    # the convolutions' and dense layers' accumulations (two per MAC) are fused: more than the plain multiplies
    assert len(fused) > len(multiplies), (len(fused), len(multiplies))


@needs_arm
def test_residual_sum_written_in_place_on_cortex_m4(tmp_path):
    """A residual block (x = relu(conv(input)); y = relu(conv(relu(conv(x))) + x); z = conv(y)) on
    Cortex-M4: the block's output takes over x's bytes and the convolutions read their zero border
    themselves, so the arena holds two feature maps (x and the hidden one, mean and variance)
    instead of four; the emulated result is the NumPy reference's."""
    from helpers import make_model, random_std

    rng = np.random.default_rng(5)
    inits = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in
             [("w0", (4, 2, 3, 3)), ("b0", (4,)), ("w1", (4, 4, 3, 3)), ("b1", (4,)), ("w2", (4, 4, 3, 3)), ("b2", (4,)),
              ("w3", (3, 4, 1, 1))]}
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [onnx.helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], **conv), onnx.helper.make_node("Relu", ["c0"], ["x"]),
             onnx.helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv), onnx.helper.make_node("Relu", ["c1"], ["h"]),
             onnx.helper.make_node("Conv", ["h", "w2", "b2"], ["c2"], **conv), onnx.helper.make_node("Add", ["c2", "x"], ["s"]),
             onnx.helper.make_node("Relu", ["s"], ["y"]), onnx.helper.make_node("Conv", ["y", "w3"], ["z"])]
    model = make_model(nodes, [("input", [1, 2, 6, 8])], ["z"], inits)
    stds = random_std(inits, rng)
    x = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    out = str(tmp_path / "out")
    result = pfpc.compile(model, stds, out_dir=out, batch=1, target="cortex-m4")
    feature_map = 2 * 4 * 4 * 6 * 8  # mean and variance, 4 x 6 x 8 floats each
    assert result.program.arena_size == 2 * feature_map  # three without the in-place sum
    residual = [step for step in result.program.steps if step.in_place]
    assert len(residual) == 1 and all(a.offset == b.offset for a, b in residual[0].in_place)
    (mean, var), = compiler.run(out, [x], emulate=True).outputs
    ref_mean, ref_var = reference.pfp_onnx(model, {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}, {"input": x})["z"]
    np.testing.assert_allclose(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, atol=1e-4 * np.abs(ref_mean).max())
    np.testing.assert_allclose(var.reshape(ref_var.shape), ref_var, rtol=1e-4, atol=1e-4 * np.abs(ref_var).max())
