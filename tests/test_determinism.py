"""Compiling the same inputs gives byte-identical output directories: every file, every target
(the Cortex-M firmware files included), in separate Python processes with different hash seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_hostile_names import HOSTILE, _model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LENET = [os.path.join(ROOT, "examples", "lenet", f) for f in ("model.onnx", "post.npz")]
MLP = [os.path.join(ROOT, "examples", "mlp", f) for f in ("model.onnx", "post.npz")]


def _variants(hostile_model):
    return {
        "lenet_host": [LENET[0], "--posterior", LENET[1], "--batch", "1"],
        "lenet_cortex_m4": [LENET[0], "--posterior", LENET[1], "--batch", "1", "--target", "cortex-m4"],
        "lenet_aarch64": [LENET[0], "--posterior", LENET[1], "--batch", "2", "--target", "aarch64"],
        "lenet_svi": [LENET[0], "--posterior", LENET[1], "--batch", "1", "--mode", "svi", "--samples", "8"],
        "mlp_cortex_m7_outputs": [MLP[0], "--posterior", MLP[1], "--batch", "3", "--target", "cortex-m7", "--outputs", "probs,entropy,ood"],
        "hostile_names": [hostile_model, "--deterministic"],
    }


def _tree(directory):
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, directory)] = handle.read()
    return files


def test_compiles_are_byte_identical_across_processes(tmp_path):
    hostile = tmp_path / "hostile.onnx"
    hostile.write_bytes(_model(HOSTILE)[0].SerializeToString())
    variants = _variants(str(hostile))
    script = ("import json, sys\nfrom pfpc.cli import main\n"
              "for name, args in json.loads(sys.argv[2]).items():\n"
              "    assert main(args + ['-o', f'{sys.argv[1]}/{name}']) == 0, name\n")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": ROOT}
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / seed), json.dumps(variants)],
                                capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    for name in variants:
        first, second = _tree(tmp_path / "1" / name), _tree(tmp_path / "2" / name)
        assert sorted(first) == sorted(second), name
        assert len(first) >= 7, (name, sorted(first))
        for file_name in first:
            assert first[file_name] == second[file_name], f"{name}/{file_name} differs"
    assert "firmware/startup_cortex_m.c" in _tree(tmp_path / "1" / "lenet_cortex_m4")
