"""``--ram-limit`` / ``pfpc.compile(ram_limit=...)`` chooses the plan: the most accurate (covariance
budget, moment storage) whose arena + stack fit, checked against the footprints of the plans
compiled directly; nothing fits: one line, exit 2, nothing written."""

import json
import os

import numpy as np
import onnx
import pytest

import pfpc
import test_covariance as TC
from pfpc.cli import main


@pytest.fixture(scope="module")
def linear_conv_net():
    """conv 3x3 -> global average pool -> dense: `--covariance auto` carries the conv's loadings."""
    model, stds, _ = TC._onnx(TC.LinearConvNet)
    return model, {name + ".std": std for name, std in stds.items()}


def _ram(model, posterior, **options):
    compiled = pfpc.compile(model, posterior, batch=1, measure=True, **options)
    return compiled.footprint["arena_bytes"] + compiled.footprint["stack_bytes"], compiled


def test_the_limit_picks_the_most_accurate_plan_that_fits(linear_conv_net, tmp_path):
    model, posterior = linear_conv_net
    asked, _ = _ram(model, posterior)
    halved, direct = _ram(model, posterior, moment_storage="bfloat16")
    assert direct.program.covariance  # bfloat16 keeps the loadings
    assert halved < asked
    limit = (halved + asked) // 2
    chosen = pfpc.compile(model, posterior, batch=1, ram_limit=limit, out_dir=str(tmp_path / "chosen"))
    line = chosen.footprint["ram_plan"]
    assert "--covariance auto --covariance-budget 0.5 --moment-storage bfloat16" in line and f"{halved:,} bytes" in line
    assert chosen.footprint["arena_bytes"] + chosen.footprint["stack_bytes"] == halved <= limit
    # the chosen build is the plan compiled directly, byte for byte
    direct.save(str(tmp_path / "direct"))
    for name in ("pfp_model.c", "pfp_model.h", "pfp_model_weights.h"):
        assert (tmp_path / "chosen" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    # a limit the plan asked for meets leaves it alone
    roomy = pfpc.compile(model, posterior, batch=1, ram_limit=asked)
    assert "the plan asked for fits" in roomy.footprint["ram_plan"] and roomy.footprint["ram_bytes"] == asked


def test_the_limit_drops_the_loadings_last_and_refuses_with_one_line(linear_conv_net, tmp_path, capsys):
    """Below every covariance plan the diagonal PFP, float32 variances before bfloat16, one printed
    line saying so; below the smallest plan: exit 2, one line naming its RAM, nothing written."""
    model, posterior = linear_conv_net
    diagonal, _ = _ram(model, posterior, covariance="none")
    smallest, _ = _ram(model, posterior, covariance="none", moment_storage="bfloat16")
    assert smallest < diagonal
    onnx.save(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "post.npz", **posterior)
    args = [str(tmp_path / "model.onnx"), "--posterior", str(tmp_path / "post.npz"), "--batch", "1"]
    assert main(args + ["-o", str(tmp_path / "fits"), "--ram-limit", str(diagonal)]) == 0
    chosen = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pfpc: RAM limit")]
    assert len(chosen) == 1 and "--moment-storage float32 (no loadings placed: the diagonal PFP)" in chosen[0]
    assert f"= {diagonal:,} bytes" in chosen[0]
    assert "covariance" not in json.loads((tmp_path / "fits" / "pfpc.json").read_text())
    out = tmp_path / "out"
    assert main(args + ["-o", str(out), "--ram-limit", "4KiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"model.onnx: the model needs {smallest:,} bytes of RAM" in err and "--covariance none --moment-storage bfloat16" in err
    assert "more than the limit of 4,096 bytes" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".pfpc")]


def test_ram_counts_the_kernels_static_arrays(tmp_path):
    """A softmax over 300 classes keeps rows over TVM's 1 KiB stack limit as static arrays of its
    kernel (.bss outside the arena): the RAM reported, the header's _STATIC_BYTES and a limit between
    arena + stack and the whole RAM count them, checked against the .bss the target's `size` measures
    (the static arena plus those arrays); they were left out before."""
    from helpers import make_model
    from onnx import helper

    rng = np.random.default_rng(5)
    w = (0.5 * rng.standard_normal((16, 300))).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)],
                       [("x", [1, 16])], ["y"], {"w": w})
    posterior = {"w.std": np.full(w.shape, 0.05, np.float32)}
    compiled = pfpc.compile(model, posterior, batch=1, measure=True, out_dir=str(tmp_path / "out"))
    footprint = compiled.footprint
    if not footprint["measured_with"]:
        pytest.skip(f"no host toolchain: {footprint.get('note')}")
    static = footprint["bss_bytes"] - 4 * ((footprint["arena_bytes"] + 3) // 4)
    assert static >= 4 * 300 and footprint["static_bytes"] == static  # at least one row of 300 floats
    assert footprint["ram_bytes"] == footprint["arena_bytes"] + static + footprint["stack_bytes"] + footprint["data_bytes"]
    assert f"#define PFP_MODEL_STATIC_BYTES {static}\n" in (tmp_path / "out" / "pfp_model.h").read_text()
    with pytest.raises(pfpc.PfpcError, match=rf"static {static:,} \+ stack"):
        pfpc.compile(model, posterior, batch=1, ram_limit=footprint["ram_bytes"] - 1)
