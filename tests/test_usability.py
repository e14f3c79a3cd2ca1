"""The traps a new user fell into (issue 21) and the faults that must lose nothing (issue 20):
a compile without a posterior, CMake's default flags, a fast CLI, per-layer instruction counts,
--force on a user's directory, symlinks, signals, concurrent compiles, read-only outputs, a
posterior .npz that claims gigabytes, a closed pipe, internal errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
import pytest

import pfpc.compiler as compiler
from pfpc.cli import main

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLES = os.path.join(ROOT, "examples")
MLP, MLP_POST = (os.path.join(EXAMPLES, "mlp", name) for name in ("model.onnx", "post.npz"))
SAMPLE = os.path.join(EXAMPLES, "mlp", "sample.npy")
ENV = {**os.environ, "PYTHONPATH": ROOT}
needs_arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")),
                               reason="needs arm-none-eabi-gcc and qemu-system-arm")


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pfpc.cli", *args], capture_output=True, text=True, env=ENV, **kwargs)


def _staging(directory):
    return [n for n in os.listdir(directory) if n.startswith(".pfpc-")]


def test_compile_without_posterior_is_refused_unless_deterministic(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([MLP, "--batch", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no --posterior" in err and "--deterministic" in err and not out.exists()
    assert main([MLP, "--batch", "1", "-o", str(out), "--posterior", MLP_POST, "--deterministic"]) == 2
    assert main([MLP, "--batch", "1", "-o", str(out), "--deterministic"]) == 0
    assert "every variance is zero" in capsys.readouterr().out


def test_help_version_and_argument_errors_do_not_import_tvm():
    """Answered without importing TVM (the 6-16 s every command took): checked as sys.modules."""
    script = ("import sys\nfrom pfpc.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
              "print('TVM' if 'tvm' in sys.modules else 'no tvm', code)\n")
    for args, code in ((["--help"], 0), (["--version"], 0), (["run", "--help"], 0), (["--bogus"], 2),
                       ([MLP, "-o", "x"], 2), (["run", "nowhere", "--input", "x.npy"], 2)):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV)
        assert result.stdout.splitlines()[-1] == f"no tvm {code}", (args, result.stdout[-300:], result.stderr)
    help_text = _cli("--help").stdout
    for word in ("run", "report", "verify", "evaluate", "bench", "compress", "import-posterior", "example",
                 "cortex-m4", "cortex-m55", "aarch64", "--deterministic"):
        assert word in help_text, word
    assert _cli("--version").stdout.startswith("pfpc ")


def _text_and_rodata(size_tool, obj):
    sections = compiler.footprint.section_sizes(size_tool, obj)
    return {k: v for k, v in sections.items() if k.startswith((".text", ".rodata"))}


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake")
@pytest.mark.parametrize("target", ["host", "cortex-m4"])
def test_cmake_default_build_matches_the_makefile(tmp_path, target):
    """Configured without CMAKE_BUILD_TYPE, the CMake build compiles the library to the same code
    as the generated Makefile (-O2): CMake's own default is -O0."""
    if target != "host" and not shutil.which("arm-none-eabi-gcc"):
        pytest.skip("needs arm-none-eabi-gcc")
    out = tmp_path / "out"
    compiler.compile(MLP, MLP_POST, out_dir=str(out), batch=1, target=target)
    subprocess.run(["make", "-s", "-C", str(out), "pfp_model.o"], check=True, capture_output=True)
    build = tmp_path / "build"
    toolchain = [f"-DCMAKE_TOOLCHAIN_FILE={out / 'toolchain.cmake'}"] if target != "host" else []
    subprocess.run(["cmake", "-S", str(out), "-B", str(build), *toolchain], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    size_tool = "arm-none-eabi-size" if target != "host" else "size"
    made = _text_and_rodata(size_tool, str(out / "pfp_model.o"))
    objects = build / "CMakeFiles" / "pfp_model.dir"
    cmade = _text_and_rodata(size_tool, str(next(p for p in objects.glob("pfp_model.c.o*") if not p.name.endswith(".d"))))  # .o, or .obj for Generic systems
    assert made == cmade and made[".text"] > 0


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_host_makefile_adds_gccs_own_flags_only_under_gcc(tmp_path, cc):
    """The host's `targets.HOST_GCC_FLAGS` (--param, which clang rejects under the Makefile's
    -Werror) reach gcc's command line and not clang's, and both build the library."""
    from pfpc.codegen.targets import HOST_GCC_FLAGS

    if not shutil.which(cc):
        pytest.skip(f"needs {cc}")
    out = tmp_path / "out"
    compiler.compile(MLP, MLP_POST, out_dir=str(out), batch=1)
    command = subprocess.run(["make", "-n", "-C", str(out), f"CC={cc}", "pfp_model.o"], check=True, capture_output=True, text=True).stdout
    assert all((flag in command) == (cc == "gcc") for flag in HOST_GCC_FLAGS), command
    subprocess.run(["make", "-s", "-C", str(out), f"CC={cc}", "pfp_model.o"], check=True, capture_output=True)


def _trace_layers(out_dir, steps):
    """Instructions between consecutive counter reads of the profiled program, counted by QEMU's
    own execution trace (one translation block per instruction): an independent count per layer."""
    target = compiler.get_target(compiler.read_metadata(out_dir)["target"])
    x = np.load(SAMPLE)[:1].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        x.tofile(os.path.join(tmp, "in.f32"))
        command = target.emulator_command(os.path.join(out_dir, "pfp_model_profile.elf"), ["in.f32", "out.f32"])
        command[1:1] = ["-singlestep", "-d", "exec,nochain", "-D", "trace.log"]
        subprocess.run(command, cwd=tmp, check=True, capture_output=True, timeout=600)
        names = [line.split()[-1] for line in open(os.path.join(tmp, "trace.log")) if line.startswith("Trace")]
    counter = "pfpc_systick_ticks"
    starts = [i for i, name in enumerate(names) if name == counter and names[i - 1] != counter]
    ends = [i for i, name in enumerate(names) if name == counter and names[i + 1] != counter]
    # reads: main's start, the hook before the first kernel, one after every kernel, main's end
    return [starts[k + 1] - ends[k] - 1 for k in range(1, steps + 1)]


@needs_arm
def test_profile_counts_every_layer(tmp_path, capsys):
    """pfpc run --emulate --profile: per kernel, the instructions QEMU executes between the counter
    reads around it (checked against QEMU's execution trace to one SysTick period); the rows add up
    to the call's total; the same firmware build counts for --cycles."""
    out = str(tmp_path / "m4")
    compiler.compile(MLP, MLP_POST, out_dir=out, batch=1, target="cortex-m4")
    meta = compiler.read_metadata(out)
    result = compiler.run(out, [np.load(SAMPLE)], profile=True)
    kernels, executor = result.layers[:-1], result.layers[-1]
    assert [layer["kernel"] for layer in kernels] == [layer["kernel"] for layer in meta["layers"]]
    source = open(os.path.join(out, "pfp_model.c")).read()
    assert all(re.search(rf"^PFP_KERNEL void {layer['function']}\(", source, re.M) for layer in kernels)  # rows lead to the C
    assert sum(layer["instructions"] for layer in result.layers) == result.cycles[0]
    tick = 1e9 / compiler.get_target("cortex-m4").qemu_clock_hz
    traced = _trace_layers(out, len(kernels))
    for layer, count in zip(kernels, traced):
        assert abs(layer["instructions"] - count) <= tick, (layer, count)
    for layer, cost in zip(kernels, meta["layers"]):
        assert layer["instructions"] >= cost["pfp_fma"]  # at least one instruction per multiply-add
    assert 0 <= executor["instructions"] <= tick * (len(kernels) + 3)
    plain = compiler.run(out, [np.load(SAMPLE)], emulate=True).cycles
    assert 0 <= result.cycles[0] - plain[0] <= tick * (len(kernels) + 3)  # the reads' own cost
    assert main(["run", out, "--input", SAMPLE, "--emulate", "--profile", "--clock-mhz", "100", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert cost["estimated_ms"] == pytest.approx(cost["median_instructions"] / 1e5) and "one instruction per clock" in cost["assumes"]


def test_run_prints_class_probability_and_reading(tmp_path, capsys):
    """Per example: the class and probability of the mean-field approximation (the compiled
    default), computed here in float64 from the run's own logit moments, q_k = 1 / sum_j
    exp(-(M_k - M_j) / sqrt(1 + pi V_k / 8)), p = q / sum q; and the labels of the bundled sample."""
    out = str(tmp_path / "mlp")
    compiler.compile(MLP, MLP_POST, out_dir=out, batch=4)
    (mean, var), = compiler.run_host(out, [np.load(SAMPLE)])
    mean, var = mean.astype(np.float64), var.astype(np.float64)
    q = np.array([[1.0 / np.exp(-(row_m[k] - row_m) / np.sqrt(1 + np.pi / 8 * row_v[k])).sum() for k in range(len(row_m))]
                  for row_m, row_v in zip(mean, var)])
    probs = q / q.sum(1, keepdims=True)
    assert main(["run", out, "--input", SAMPLE, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = np.load(os.path.join(EXAMPLES, "mlp", "sample_labels.npy"))
    for example, p, label in zip(report["examples"], probs, labels):
        assert example["class"] == int(np.argmax(p)) == int(label)
        assert example["probability"] == pytest.approx(p.max(), rel=1e-5)
        assert example["entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4, abs=1e-6)
    assert main(["run", out, "--input", SAMPLE]) == 0
    text = capsys.readouterr().out
    assert "accept: class 2" in text and "prob" in text


def test_example_command_writes_the_bundled_example(tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(["example", "mlp", "-o", str(out)]) == 0
    for name in ("model.onnx", "post.npz", "sample.npy", "sample_labels.npy"):
        assert (out / name).read_bytes() == open(os.path.join(EXAMPLES, "mlp", name), "rb").read(), name
    assert main(["example", "mlp", "-o", str(out)]) == 2  # exists
    assert main(["example", "mlp", "-o", str(out), "--force"]) == 0  # its own manifest


def test_force_refuses_a_user_directory_and_symlinks(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.c").write_text("int main(void) { return 0; }\n")
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(project), "--force"]) == 2
    assert "not a directory written by pfpc" in capsys.readouterr().err
    assert (project / "main.c").exists()
    pfpc_out = tmp_path / "real"
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(pfpc_out)]) == 0
    link = tmp_path / "link"
    link.symlink_to(pfpc_out)
    capsys.readouterr()
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(link), "--force"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert link.is_symlink() and (pfpc_out / "pfp_model.h").exists()


def test_read_only_output_parent_and_replaced_read_only_output(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(parent / "out")]) == 2
        assert "cannot write the output directory" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)


def test_read_only_previous_output_is_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(out)]) == 0
    for base, dirs, files in os.walk(out):
        for name in files + dirs:
            os.chmod(os.path.join(base, name), 0o555 if name in dirs else 0o444)
    os.chmod(out, 0o555)
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(out), "--force"]) == 0
    assert (out / "pfp_model.h").exists() and not _staging(tmp_path)


def _start_compile(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "pfpc.cli", MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_compile_leaves_nothing(tmp_path, sig, code):
    """A signal while pfpc compiles or writes: exit 128+signal, one line, no traceback, no output
    and no staging directory."""
    out = tmp_path / "out"
    process = _start_compile(out)
    time.sleep(4.0)  # past the imports: inside the compile
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0 or (out / "pfpc-manifest.json").exists():
        pytest.skip("the compile finished before the signal (it then dies in the interpreter's shutdown)")
    assert process.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "interrupted" in err
    assert not out.exists() and not _staging(tmp_path)


def test_interrupt_inside_a_pass_prints_nothing_from_tvm(capfd):
    """An interrupt inside a pass's function scope left TVM's BlockBuilder with open blocks, and its
    destructor printed "BlockBuilder destroyed with remaining blocks!" beside pfpc's one line."""
    import gc

    from tvm import relax

    from pfpc.ir import KernelBuilder

    bb = KernelBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with pytest.raises(KeyboardInterrupt):
        with bb.function("main", [x]):
            with bb.dataflow():
                bb.emit(relax.op.add(x, x))
                raise KeyboardInterrupt
    del bb
    gc.collect()
    assert "BlockBuilder" not in capfd.readouterr().err


def test_stale_staging_of_a_killed_compile_is_removed(tmp_path, capsys):
    """SIGKILL gives no chance to clean up: the next compile into the same parent removes the
    staging directory of a process that no longer exists, and leaves a live one's alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".pfpc-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "pfp_model.c").write_text("/* partial */")
    live = tmp_path / f".pfpc-{os.getppid()}-xyz"
    live.mkdir()
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(tmp_path / "out")]) == 0
    assert not stale.exists() and live.exists()


def test_concurrent_compiles_into_one_output(tmp_path):
    """Two compiles with --force into one -o: both succeed or one is refused; the result is one
    complete output, no staging directory is left."""
    out = tmp_path / "out"
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(out)]) == 0
    first, second = _start_compile(out, "--force", "--name", "first"), _start_compile(out, "--force", "--name", "second")
    for process in (first, second):
        process.communicate(timeout=600)
        assert process.returncode in (0, 2)
    assert 0 in (first.returncode, second.returncode)
    name = compiler.read_metadata(str(out))["name"]
    manifest = json.loads((out / "pfpc-manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(os.path.relpath(os.path.join(b, n), out) for b, _, ns in os.walk(out)
                                              for n in ns if n != "pfpc-manifest.json")
    assert all(f.startswith((name, "pfpc", "Makefile", "CMakeLists")) for f in manifest["files"] if "/" not in f)
    assert not _staging(tmp_path)


def test_posterior_members_checked_before_decompression(tmp_path, capsys):
    """A 1 MB .npz whose member decompresses to 1 GB is refused from its declared size; a member
    with an unknown name from its name; two members of one name are refused."""
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("fc1.weight.std.npy", "w", force_zip64=True) as member:
            header = b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little")
            text = "{'descr': '<f4', 'fortran_order': False, 'shape': (268435456,), }"
            member.write(header + text.encode().ljust(117) + b"\n")
            chunk = bytes(1 << 20)
            for _ in range(1024):
                member.write(chunk)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    assert main([MLP, "--posterior", str(bomb), "--batch", "1", "-o", str(tmp_path / "out")]) == 2
    assert "would decompress to" in capsys.readouterr().err
    double = tmp_path / "double.npz"
    std = np.full((64, 64), 0.1, np.float32)
    with warnings.catch_warnings(), zipfile.ZipFile(double, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it writes
        for _ in range(2):
            with archive.open("fc1.weight.std.npy", "w") as member:
                np.lib.format.write_array(member, std)
    assert len(zipfile.ZipFile(double).namelist()) == 2
    assert main([MLP, "--posterior", str(double), "--batch", "1", "-o", str(tmp_path / "out")]) == 2
    assert "two members named 'fc1.weight.std'" in capsys.readouterr().err


def test_run_into_a_closed_pipe_is_quiet(tmp_path):
    out = tmp_path / "out"
    compiler.compile(MLP, MLP_POST, out_dir=str(out), batch=4)
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.repeat(np.load(SAMPLE), 50, axis=0))
    result = subprocess.run(f"{sys.executable} -m pfpc.cli run {out} --input {inputs} | head -1", shell=True,
                            capture_output=True, text=True, env=ENV)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_internal_error_is_one_line_with_exit_code_3(tmp_path, monkeypatch, capsys):
    """A bug (here: a pass that raises) is one line naming the step, exit code 3, no output;
    --debug raises it."""
    def broken(mod):
        raise ValueError("deliberately broken pass")

    monkeypatch.setattr(compiler, "default_passes", lambda *args, **kwargs: [("broken_pass", broken)])
    code = main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "internal error while pass broken_pass" in err and "--debug" in err
    assert not (tmp_path / "out").exists() and not _staging(tmp_path)
    with pytest.raises(ValueError):
        main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(tmp_path / "out"), "--debug"])


def test_missing_c_library_keeps_the_output(tmp_path, monkeypatch):
    """The footprint measurement cannot build (here: the compiler finds no <math.h>): the C is
    still written, the report names the missing piece and -o, never a staging directory."""
    from pfpc.codegen import footprint

    real_run = subprocess.run

    def no_libc(command, *args, **kwargs):
        if command[:2] == ["make", "-s"]:
            return subprocess.CompletedProcess(command, 2, "", f"{command[3]}/pfp_model.c:3:10: fatal error: math.h: "
                                               "No such file or directory\ncompilation terminated.")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(footprint.subprocess, "run", no_libc)
    out = tmp_path / "out"
    result = compiler.compile(MLP, MLP_POST, out_dir=str(out), batch=1, target="cortex-m4", measure=True)
    note = result.footprint["note"]
    assert (out / "pfp_model.c").exists() and "math.h" in note and "newlib" in note and str(out) in note
    assert ".pfpc-" not in note and result.footprint["code_bytes"] is None


def test_report_columns_hold_nine_digit_counts():
    from pfpc.codegen.footprint import format_report

    layer = {"kernel": "conv", "output_shape": [1, 64, 112, 112], "macs": 123_456_789_012, "pfp_fma": 987_654_321_098,
             "gaussian_ops": {}}
    footprint = {"target": "host", "flash_bytes": 1, "weights_bytes": 1, "code_bytes": 0, "ram_bytes": 1, "arena_bytes": 1,
                 "arena_lower_bound_bytes": 1, "stack_bytes": 0, "io_bytes": 0, "measured_with": "x", "layers": [layer, layer]}
    rows = format_report(footprint, "m").splitlines()[-3:]
    for row in rows:
        numbers = [token for token in row.split() if token[0].isdigit() and "," in token]
        assert len(numbers) >= 2, row  # separated by white space, not run together


def test_compiled_model_can_be_saved_and_run_later(tmp_path):
    result = compiler.compile(MLP, MLP_POST, batch=4)
    assert result.out_dir is None
    direct = result.run([np.load(SAMPLE)]).outputs
    result.save(str(tmp_path / "saved"))
    (mean, var), = compiler.run_host(str(tmp_path / "saved"), [np.load(SAMPLE)])
    np.testing.assert_array_equal(mean, direct[0][0])
    np.testing.assert_array_equal(var, direct[0][1])
    with pytest.raises(TypeError):
        compiler.compile(MLP, MLP_POST, "host")  # keyword-only after the posterior


@needs_arm
def test_image_larger_than_the_emulated_board_is_refused_before_qemu(tmp_path, monkeypatch, capsys):
    """Said before QEMU runs (it would lock up at reset): here the board's flash made smaller
    than the MLP's image (55 KB of weights and code)."""
    import pfpc.runner as runner

    out = str(tmp_path / "m4")
    compiler.compile(MLP, MLP_POST, out_dir=out, batch=1, target="cortex-m4")
    monkeypatch.setattr(runner, "board_memory", lambda target: {"FLASH": 32 * 1024, "RAM": 4 * 1024 ** 2})
    assert main(["run", out, "--input", SAMPLE, "--emulate"]) == 2
    err = capsys.readouterr().err
    assert "more than the 32,768 of the emulated board (mps2-an386)" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert runner.board_memory(compiler.get_target("cortex-m4")) == {"FLASH": 4 * 1024 ** 2, "RAM": 4 * 1024 ** 2}


@needs_arm
def test_firmware_example_prints_class_probability_and_decision(tmp_path):
    """examples/firmware on Cortex-M4 under QEMU: its class and probability against the mean-field
    approximation (the library's default output method) computed in float64 from the host build's
    logit moments, and the sample's label; the decision by the entropy (pfp_model_decide)."""
    lenet = os.path.join(EXAMPLES, "lenet")
    out = str(tmp_path / "lenet_m4")
    compiler.compile(os.path.join(lenet, "model.onnx"), os.path.join(lenet, "post.npz"), out_dir=out, batch=1, target="cortex-m4",
                     outputs=("probs", "entropy"))
    samples = os.path.join(lenet, "sample.npy")
    subprocess.run([sys.executable, os.path.join(EXAMPLES, "firmware", "make_input.py"), samples, os.path.join(out, "input_data.h")], check=True)
    run = subprocess.run(["make", "-s", "-C", os.path.join(EXAMPLES, "firmware"), f"OUT={out}", "run"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    _, best, _, probability, _, entropy, decision = next(line for line in run.stdout.splitlines() if line.startswith("class ")).split()
    (mean, var), = compiler.run_host(out, [np.load(samples)[:1]])
    m, v = mean[0].astype(np.float64), var[0].astype(np.float64)
    q = 1.0 / np.exp(-(m[:, None] - m[None, :]) / np.sqrt(1 + np.pi / 8 * v[:, None])).sum(axis=1)
    p = q / q.sum()
    assert int(best) == int(np.argmax(p)) == int(np.load(os.path.join(lenet, "sample_labels.npy"))[0])
    assert float(probability) == pytest.approx(p.max(), rel=1e-5)
    assert float(entropy) == pytest.approx(-np.sum(p * np.log(p)), rel=1e-4, abs=1e-6)
    assert decision == ("accept" if -np.sum(p * np.log(p)) <= 0.5 else "abstain")


def test_file_writer_leaves_nothing_on_failure(tmp_path):
    """pfpc.atomic.write_file (compress, import-posterior, run --output): a failing writer leaves
    the previous file as it was and no staging file."""
    from pfpc.atomic import write_file

    target = tmp_path / "shared.npz"
    target.write_bytes(b"previous")

    def fails(stream):
        stream.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(target, fails, "shared posterior")
    assert target.read_bytes() == b"previous" and not _staging(tmp_path)
    write_file(target, lambda stream: stream.write(b"new"), "shared posterior")
    assert target.read_bytes() == b"new" and not _staging(tmp_path)


def test_importer_failure_keeps_stdout_clean_and_names_the_operator(tmp_path, monkeypatch, capsys):
    """TVM's ONNX importer prints the operator it failed on to stdout: pfpc keeps it off stdout
    and names it in the one-line internal error."""
    def failing_import(model, post, label):
        print("Error converting operator Conv, with inputs: [x, w]")
        raise RuntimeError("importer defect")

    monkeypatch.setattr(compiler, "import_model", failing_import)
    assert main([MLP, "--posterior", MLP_POST, "--batch", "1", "-o", str(tmp_path / "out")]) == 3
    captured = capsys.readouterr()
    assert captured.out == "" and "(ONNX operator Conv)" in captured.err and len(captured.err.strip().splitlines()) == 1
