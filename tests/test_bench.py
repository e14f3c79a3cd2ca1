"""`pfpc bench` machinery on a small setting (the numbers themselves live in BENCHMARKS.md)."""

from __future__ import annotations

import os
import re

from pfpc.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
MLP = [os.path.join(ROOT, "examples", "mlp", "model.onnx"), "--posterior", os.path.join(ROOT, "examples", "mlp", "post.npz")]


def test_bench_times_every_predictor(tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    code = main(["bench", *MLP, "--batches", "1", "--samples", "2,4", "--cycles-target", "", "--markdown", str(markdown)])
    assert code == 0
    row = next(line for line in markdown.read_text().splitlines() if line.startswith("| 1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    pfp, det, ratio = float(cells[1].replace(",", "")), float(cells[2].replace(",", "")), float(cells[3])
    svi = [float(c.replace(",", "")) for c in cells[4:8]]  # SVI-C and onnxruntime SVI, S = 2 and 4
    assert pfp > 0 and det > 0 and min(svi) > 0 and abs(ratio - pfp / det) < 0.05 * ratio  # cells are rounded
    assert re.search(r"TVM LLVM VM", markdown.read_text())


def test_bench_rejects_bad_lists(capsys):
    assert main(["bench", *MLP, "--batches", "1,x"]) == 2
    assert "--batches: '1,x' is not a comma-separated list of integers" in capsys.readouterr().err
    assert main(["bench", *MLP, "--samples", "1"]) == 2
    assert "at least 2 samples" in capsys.readouterr().err
