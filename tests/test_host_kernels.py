"""The host's "channel_rows" kernel schedule (pfpc.ops.kernel) on every convolution shape it treats
differently, against the float64 reference (tests/reference.py) and, with zero variance,
onnxruntime: output-channel blocks (8, 4, 2, none for 7 channels), stride-2 rows read from a
deinterleaved copy (3x3 and 1x1), a pointwise convolution's narrow plane as one row, grouped and
depthwise convolutions (no shared input: no block), dense rows of 100 (one row) and 130 (split),
an element-wise kernel run over its flat tensor (8x10x5: rows of 40 instead of 5; 2x16x24: rows of 48,
two map rows); at batch 2 and 3 (the batch the outermost loop): channel blocks, a stride-2 copy, a
depthwise convolution's rows of 16 around its unrolled window, dense rows, rows of 68 over
34-column maps (none of 64 or less indexes them without divisions), and rows counted per sample
where no row fits a 5x25 map's blocks."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest
from onnx import helper

from helpers import check_against_reference, make_model
from pfpc.codegen.targets import get_target


def _conv_relu(rng, in_shape, out_channels, kernel, stride=1, pads=0, group=1):
    weight = (rng.standard_normal((out_channels, in_shape[1] // group, kernel, kernel)) * 0.5).astype(np.float32)
    bias = (rng.standard_normal(out_channels) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[stride, stride], pads=[pads] * 4, group=group),
             helper.make_node("Relu", ["c"], ["y"])]
    return nodes, [("x", in_shape)], {"w": weight, "b": bias}


def _dense_relu(rng, inputs, outputs):
    weight = (rng.standard_normal((inputs, outputs)) * 0.3).astype(np.float32)
    bias = (rng.standard_normal(outputs) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return nodes, [("x", [1, inputs])], {"w": weight, "b": bias}


def _dense_relu_batch(rng, batch, inputs, outputs):
    nodes, _, inits = _dense_relu(rng, inputs, outputs)
    return nodes, [("x", [batch, inputs])], inits


def _maxpool_relu(rng, in_shape, kernel, stride, pads=0):
    """A stochastic addend first: the max-pool's input Gaussian (Clark's steps)."""
    addend = (rng.standard_normal(in_shape) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pads] * 4),
             helper.make_node("Relu", ["p"], ["y"])]
    return nodes, [("x", in_shape)], {"b": addend}


def _add_relu(rng, shape):
    addend = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return nodes, [("x", shape)], {"b": addend}


CASES = {
    "stride2_3x3_block8": lambda r: _conv_relu(r, [1, 3, 12, 12], 16, 3, stride=2, pads=1),
    "stride2_1x1_block4": lambda r: _conv_relu(r, [1, 4, 10, 10], 4, 1, stride=2),
    "stride1_3x3_odd_channels": lambda r: _conv_relu(r, [1, 3, 8, 8], 7, 3, pads=1),
    "pointwise_narrow_plane": lambda r: _conv_relu(r, [1, 6, 9, 5], 8, 1),
    "grouped_and_depthwise": lambda r: _conv_relu(r, [1, 4, 7, 6], 4, 3, pads=1, group=4),
    "grouped_two": lambda r: _conv_relu(r, [1, 4, 6, 6], 8, 3, stride=2, pads=1, group=2),
    "depthwise_rows_of_5": lambda r: _conv_relu(r, [1, 6, 9, 5], 6, 3, pads=1, group=6),
    "dense_row_100": lambda r: _dense_relu(r, 12, 100),
    "dense_row_130_split": lambda r: _dense_relu(r, 9, 130),
    "elementwise_flat_rows": lambda r: _add_relu(r, [1, 8, 10, 5]),
    "elementwise_rows_across_map_rows": lambda r: _add_relu(r, [1, 2, 16, 24]),
    # batch > 1: the batch is the outermost loop of every kernel
    "batch3_3x3_block8_rows16": lambda r: _conv_relu(r, [3, 4, 16, 16], 8, 3, pads=1),
    "batch2_stride2_3x3_block8": lambda r: _conv_relu(r, [2, 3, 12, 12], 16, 3, stride=2, pads=1),
    "batch2_depthwise_rows_of_16": lambda r: _conv_relu(r, [2, 4, 16, 16], 4, 3, pads=1, group=4),
    "batch2_dense_row_100": lambda r: _dense_relu_batch(r, 2, 12, 100),
    "batch2_elementwise_rows_of_68": lambda r: _add_relu(r, [2, 3, 10, 34]),
    "batch3_elementwise_rows_per_sample": lambda r: _add_relu(r, [3, 4, 5, 25]),
    # rows of one vector or less: whole output planes accumulated per tap (`schedule._accumulate_planes`)
    "batch2_planes_3x3_block8": lambda r: _conv_relu(r, [2, 6, 6, 6], 16, 3),
    "batch3_planes_rows_of_3_block2": lambda r: _conv_relu(r, [3, 5, 5, 3], 6, 3, pads=1),
    "batch2_planes_5x5_rows_of_2": lambda r: _conv_relu(r, [2, 3, 8, 6], 8, 5),
    # a max-pool's window elements gathered into rows of their own; padding: the pick steps
    "batch2_maxpool_relu": lambda r: _maxpool_relu(r, [2, 3, 6, 6], 2, 2),
    "maxpool_3x3_padded_relu": lambda r: _maxpool_relu(r, [1, 2, 7, 5], 3, 2, pads=1),
}


def test_host_uses_the_channel_rows_schedule():
    assert get_target("host").accumulate == "channel_rows"
    assert get_target("cortex-m4").accumulate == "scalar" and get_target("cortex-m55").accumulate == "row"


def test_cortex_a_builds_at_O3_without_the_hosts_trapping_flag():
    """benchmarks/cortex_a.md: -O3 took 0.68-0.79x the PFP's and 0.37-0.49x the deterministic
    network's Cortex-A53 instructions of -O2; -fno-trapping-math changed them by under 1.5 %."""
    from pfpc.codegen.targets import c_flags

    for name in ("cortex-a53", "cortex-a72", "aarch64"):
        flags = c_flags(get_target(name))
        assert "-O3" in flags and "-O2" not in flags and "-fno-trapping-math" not in flags, (name, flags)
        assert get_target(name).accumulate == "channel_rows"


@pytest.mark.parametrize("case", sorted(CASES))
def test_channel_rows_kernel_matches_reference(tmp_path, zero_var, case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    nodes, inputs, inits = CASES[case](rng)
    model = make_model(nodes, inputs, ["y"], inits)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in inputs}
    check_against_reference(model, inits, feeds, tmp_path, rng, zero_var, stochastic=[k for k in ("w", "b") if k in inits])


def test_flat_rows_index_by_the_row_loop_and_keep_rows_on_the_stack(tmp_path):
    """Element-wise kernels over the flat tensor: on 24-column maps the row is 48 (two map rows),
    not 64, so every element is read at the row loop's own index (rows of 64 read x[(f / 3) * 24 +
    f % 24], which gcc does not vectorise); on 32x32 maps rows of 64 cross the map's rows and the
    stages' buffers are flat, so they stay a row long on the stack. Before, TVM's buffer compaction
    kept a stage's whole plane (a 16x32x32 ReLU loading: 1,024 floats), which its C backend
    allocates from its runtime, and the kernel silently fell back to one scalar loop nest."""
    import onnx

    from pfpc import compiler

    rng = np.random.default_rng(3)
    for shape, row in (([1, 2, 16, 24], 48), ([1, 16, 32, 32], 64)):
        nodes, inputs, inits = _add_relu(rng, shape)
        directory = tmp_path / "x".join(map(str, shape))
        directory.mkdir()
        onnx.save(make_model(nodes, inputs, ["y"], inits), directory / "model.onnx")
        np.savez(directory / "post.npz", **{"b.std": np.full(shape, 0.1, np.float32)})
        compiler.compile(str(directory / "model.onnx"), str(directory / "post.npz"), out_dir=str(directory / "out"), target="host")
        source = (directory / "out" / "pfp_model.c").read_text()
        bodies = re.findall(r"^PFP_KERNEL void k_\w+\(.*?^}", source, re.S | re.M)
        assert len(bodies) == 2
        for body in bodies:
            assert not re.search(rf"% {shape[-1]}\b", body), body
            assert re.search(rf"< {row}; \+\+", body), body  # the row loop
            sizes = [int(n) for n in re.findall(r"float \w+_ptr\[(\d+)\];", body)]
            assert sizes and max(sizes) <= row, body


def test_window_sums_accumulate_a_row_of_partial_sums(tmp_path):
    """The covariance pass's narrow window sums (3x3 outputs, each a sum over a whole 16x16 map) accumulate a
    row of partial sums along the map's rows, innermost, which gcc vectorises, and add the row up
    per output; with one accumulator per output they were a chain of dependent float additions
    (ResNet-8 on the host: 15 % of the PFP's time). Their values: test_covariance_compiled's
    TinyResNet against the float64 reference."""
    import test_covariance as TC

    import pfpc

    model, stds, _ = TC._onnx(TC.TinyResNet)
    pfpc.compile(model, {k + ".std": v for k, v in stds.items()}, covariance="channel", batch=1, out_dir=str(tmp_path / "out"), target="host")
    source = (tmp_path / "out" / "pfp_model.c").read_text()
    # windows as large as the 16x16 maps: 3x3 outputs (the 8x8 windows of the strided block have rows of 4)
    narrow = re.findall(r"^PFP_KERNEL void k_window_ones_\d+x16x16\w*\(.*?^}", source, re.S | re.M)
    assert narrow
    for body in narrow:
        row = re.search(r"float (\w+_rf_ptr)\[(\d+)\];", body)
        assert row and int(row.group(2)) >= 8, body
        # the row is the innermost loop: its accumulation follows the loop over the row directly
        assert re.search(r"for \(int32_t (\w+) = 0; \1 < %s; \+\+\1\) \{\s*%s\[\1\] =" % (row.group(2), row.group(1)), body), body


def test_pads_and_stride2_copies_have_no_per_element_tests(tmp_path):
    """A Pad's output is a fill and an interior copy (a load under a per-element test stayed
    scalar: ResNet-8's pads took three times TVM's LLVM build's time), and a stride-2
    convolution's deinterleaving copy moves (even, odd) pairs (the index (k & 1) * half + (k >> 1)
    per element stayed scalar: half of ResNet-8's stride-2 convolutions' host time). Their values:
    `test_channel_rows_kernel_matches_reference` (stride2_3x3_block8: a 14-column padded input)."""
    import onnx

    from pfpc import compiler

    rng = np.random.default_rng(5)
    first, inputs, inits = _conv_relu(rng, [1, 3, 16, 16], 8, 3, stride=1, pads=1)
    weight = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    nodes = first + [helper.make_node("Conv", ["y", "w2"], ["c2"], strides=[2, 2], pads=[1] * 4),
                     helper.make_node("Relu", ["c2"], ["z"])]
    onnx.save(make_model(nodes, inputs, ["z"], {**inits, "w2": weight}), tmp_path / "model.onnx")
    np.savez(tmp_path / "post.npz", **{"w.std": np.full(inits["w"].shape, 0.05, np.float32),
                                        "w2.std": np.full(weight.shape, 0.05, np.float32)})
    compiler.compile(str(tmp_path / "model.onnx"), str(tmp_path / "post.npz"), out_dir=str(tmp_path / "out"), target="host")
    source = (tmp_path / "out" / "pfp_model.c").read_text()
    bodies = dict(re.findall(r"^PFP_KERNEL void (k_\w+)\((.*?^})", source, re.S | re.M))
    pads = [body for name, body in bodies.items() if name.endswith("_pad")]
    assert pads, list(bodies)
    for body in pads:
        assert "if (" not in body and "?" not in body, body
    copies = [body for body in bodies.values() if "_global_ptr[" in body]
    assert copies, list(bodies)
    for body in copies:
        assert "& 1)" not in body and ">> 1)" not in body, body


def test_depthwise_rows_run_around_the_unrolled_window(tmp_path):
    """A depthwise convolution's short rows (DS-CNN's 5) run their outputs innermost around the
    unrolled 3x3 window (`schedule._narrow_unshared_rows`): one loop over the row per output row,
    which gcc vectorises with the sums in registers, instead of one loop of 5 per tap (about 3x
    TVM's LLVM time on DS-CNN). Values: `test_channel_rows_kernel_matches_reference`
    (depthwise_rows_of_5, grouped_and_depthwise)."""
    import onnx

    from pfpc import compiler

    rng = np.random.default_rng(7)
    nodes, inputs, inits = _conv_relu(rng, [1, 6, 9, 5], 6, 3, pads=1, group=6)
    onnx.save(make_model(nodes[:1], inputs, ["c"], inits), tmp_path / "model.onnx")  # the convolution alone: its epilogue the bias
    np.savez(tmp_path / "post.npz", **{"w.std": np.full(inits["w"].shape, 0.05, np.float32)})
    compiler.compile(str(tmp_path / "model.onnx"), str(tmp_path / "post.npz"), out_dir=str(tmp_path / "out"), target="host")
    source = (tmp_path / "out" / "pfp_model.c").read_text()
    bodies = [body for body in re.findall(r"^PFP_KERNEL void k_\w+\(.*?^}", source, re.S | re.M) if "weight_var" in body or "w_var" in body]
    assert bodies, source[:2000]
    for body in bodies:
        rows = re.findall(r"< 5; \+\+", body)
        assert 1 <= len(rows) <= 3, body  # the row loop (and its epilogue's), not one per tap


def _kernel_bodies(tmp_path, nodes, inputs, inits, stds, target="host", **options):
    import onnx

    from pfpc import compiler

    directory = tmp_path / target
    directory.mkdir()
    onnx.save(make_model(nodes, inputs, [nodes[-1].output[0]], inits), directory / "model.onnx")
    np.savez(directory / "post.npz", **stds)
    compiler.compile(str(directory / "model.onnx"), str(directory / "post.npz"), out_dir=str(directory / "out"), target=target, **options)
    return re.findall(r"^PFP_KERNEL void k_\w+\(.*?^}", (directory / "out" / "pfp_model.c").read_text(), re.S | re.M)


def test_flat_rows_of_68_over_34_column_maps_at_batch_2(tmp_path):
    """No row of 64 or less divides a 34-column map's rows or is a multiple of them (ResNet-8's
    padded 34x34 maps): rows of 68 (two map rows) index every element by the row loop, where rows
    of 60 read x[... % 34] from batch 2 on (ResNet-8's independent-variance stages at batch 8: 1.5x
    TVM's LLVM time). Values: `test_channel_rows_kernel_matches_reference` (batch2_elementwise_rows_of_68)."""
    shape = [2, 3, 10, 34]
    nodes, inputs, inits = _add_relu(np.random.default_rng(11), shape)
    bodies = _kernel_bodies(tmp_path, nodes, inputs, inits, {"b.std": np.full(shape, 0.1, np.float32)})
    assert len(bodies) == 2
    for body in bodies:
        assert not re.search(r"[/%] \d+[)\s]", body), body  # no integer division or remainder in an index
        assert re.search(r"< 68; \+\+", body), body


def test_depthwise_rows_of_16_run_around_the_unrolled_window_at_batch_2(tmp_path):
    """`schedule._narrow_unshared_rows` takes rows up to 16 (ResNet-8's 16x16 depthwise window sums of
    the covariance pass: 177 -> 36 µs at batch 8 on the host, TVM's LLVM build 41): one loop over
    the row per output row, not one per tap. Values: `test_channel_rows_kernel_matches_reference`
    (batch2_depthwise_rows_of_16)."""
    rng = np.random.default_rng(13)
    nodes, inputs, inits = _conv_relu(rng, [2, 4, 16, 16], 4, 3, pads=1, group=4)
    bodies = [b for b in _kernel_bodies(tmp_path, nodes[:1], inputs, inits, {"w.std": np.full(inits["w"].shape, 0.05, np.float32)})
              if "w_var" in b]
    assert bodies
    for body in bodies:
        # the map's rows, the row loop and its epilogue's; not a loop over the row per tap (9 or more)
        assert 2 <= len(re.findall(r"< 16; \+\+", body)) <= 4, body


def test_single_accumulators_are_not_regrouped_on_the_host(tmp_path):
    """A sum into one accumulator (``acc[0]``, ``out[i0 * 3]`` across a loop over k: the covariance
    pass's window sums over a whole map, a dense layer's narrow outputs) is one chain of dependent additions: on the host it keeps
    ``acc + (a + b)``, one addition per term on the chain, where Cortex-M's ``(acc + a) + b``
    (`codegen.kernels.fused_accumulation`, two fused multiply-adds there) put two on it (ResNet-8's
    add-variance kernels took twice TVM's LLVM time at batch 8). Rows of accumulators (``acc[i]``)
    keep the regrouping (the checks of `_chained` above). Values: test_covariance_compiled's reference tests on the host."""
    from pfpc.codegen.kernels import _chained

    line = "  float v = (acc[%s] + ((a[k] * b[k]) + (c[k] * d[k])));"
    assert _chained(line % "0", "k", {}) and _chained(line % "cse_v1", "k", {"cse_v1": {"i0"}})
    assert not _chained(line % "i3", "i3", {}) and not _chained(line % "cse_v2", "i3", {"cse_v2": {"i0", "i3"}})
    rng = np.random.default_rng(17)
    nodes, inputs, inits = _dense_relu(rng, 16, 80)
    # a Gaussian input (mean and variance: two terms per variance update) summed over 80 into 3 outputs, each its own accumulator
    nodes.append(helper.make_node("Gemm", ["y", "w2"], ["z"]))
    inits["w2"] = (rng.standard_normal((80, 3)) * 0.3).astype(np.float32)
    stds = {"w.std": np.full(inits["w"].shape, 0.05, np.float32), "w2.std": np.full(inits["w2"].shape, 0.05, np.float32)}
    regrouped = re.compile(r"=\s*\(\(\w+\[\w+\] \+ \(")  # (acc[k] + (w v ...)) + (...)
    host = "\n".join(_kernel_bodies(tmp_path, nodes, [("x", [2, 16])], inits, stds))
    m4 = "\n".join(_kernel_bodies(tmp_path, nodes, [("x", [2, 16])], inits, stds, target="cortex-m4"))
    assert regrouped.search(m4), m4
    assert not regrouped.search(host) and re.search(r"=\s*\(\w+\[\w+\] \+ \(\(", host), host


def test_flat_rows_are_counted_per_sample_where_no_row_fits_the_maps(tmp_path):
    """A 4x5x25 sample (DS-CNN's 64x25x5 maps) has no row of 16 to 128 that divides, or is a multiple
    of, its 25-element rows and 125-element planes; at batch 3 its rows are counted per sample
    (loops: sample, row, element), so every index is the sample's offset plus the row loop's
    own, as at batch 1; rows across the batch read x[(f / 125) * ... + f % 125] (DS-CNN's ReLU
    stages at batch 8: 2.5x TVM's LLVM time). Values: `test_channel_rows_kernel_matches_reference`
    (batch3_elementwise_rows_per_sample)."""
    shape = [3, 4, 5, 25]
    nodes, inputs, inits = _add_relu(np.random.default_rng(19), shape)
    bodies = _kernel_bodies(tmp_path, nodes, inputs, inits, {"b.std": np.full(shape, 0.1, np.float32)})
    assert len(bodies) == 2
    for body in bodies:
        assert re.search(r"< 3; \+\+", body), body  # the samples' loop
        # reads and writes of the parameters: no division or remainder in their indices
        for index in re.findall(r"\b(?:x_mean|x_var|b_mean|out_mean|out_var)\[([^\]]*)\]", body):
            assert not re.search(r"[/%]", index), body
        for local in re.findall(r"int32_t (\w+) = ([^;]*);", body):
            if re.search(r"[/%] \d+", local[1]):  # a division may only offset the stage buffers (a row's start within them)
                assert not re.search(rf"\b(?:x_mean|x_var|b_mean|out_mean|out_var)\[[^\]]*\b{local[0]}\b", body), body


def test_rows_of_one_vector_accumulate_whole_planes_per_tap(tmp_path):
    """A convolution with output rows of one vector or less (the digits LeNet's conv2: 6 -> 16
    channels, 4x4 outputs) accumulates blocks of 8 channels' whole 4x4 planes (128 floats per
    moment) at batch 2, the taps outside the plane's rows: loops (c, y, x, channel) under the
    block, not a row per tap (`schedule._accumulate_planes`); 7 channels (no block) keep one
    channel's row, and batch 1 the rows of `_channel_block` (32 floats). Values:
    `test_channel_rows_kernel_matches_reference` (the planes cases)."""
    rng = np.random.default_rng(23)
    nodes, inputs, inits = _conv_relu(rng, [2, 6, 6, 6], 16, 3)
    stds = {"w.std": np.full(inits["w"].shape, 0.05, np.float32)}
    (body,) = [b for b in _kernel_bodies(tmp_path, nodes, inputs, inits, stds) if "conv2d" in b]
    assert sorted(int(n) for n in re.findall(r"float conv2d_v\d_ptr\[(\d+)\];", body)) == [128, 128], body
    # per input channel one loop over the plane's 4 rows with the 9 taps unrolled inside, not 4 rows x 9 taps loops of 4
    update = body[body.index("for (int32_t c = 0; c < 6; ++c)"):]
    assert len(re.findall(r"for \(int32_t (i2(?:_\d)?) = 0; \1 < 4; \+\+\1\)", update)) == 9, body
    nodes, inputs, inits = _conv_relu(rng, [2, 6, 6, 6], 7, 3)
    (tmp_path / "seven").mkdir()
    (body,) = [b for b in _kernel_bodies(tmp_path / "seven", nodes, inputs, inits, {"w.std": np.full(inits["w"].shape, 0.05, np.float32)})
               if "conv2d" in b]
    assert not re.search(r"float conv2d_v\d_ptr\[\d\d+\];", body), body
    nodes, inputs, inits = _conv_relu(rng, [1, 6, 6, 6], 16, 3)
    (tmp_path / "batch1").mkdir()
    (body,) = [b for b in _kernel_bodies(tmp_path / "batch1", nodes, inputs, inits, stds) if "conv2d" in b]
    assert sorted(int(n) for n in re.findall(r"float conv2d_v\d_ptr\[(\d+)\];", body)) == [32, 32], body


def test_max_pool_window_elements_are_gathered_rows(tmp_path):
    """A max-pool's Clark steps read window element k from a row of its own
    (``maxpool_element_k``) on the host: read from the input under the tail form's and the pick's
    branches, gcc kept those rows scalar; and Clark's tail test reads |al| from a row of its own
    (``maxpool_distance_k``: gcc folded max(al, -al) >= 2 into a select of tests its vectoriser
    rejects). Cortex-M inlines both (one expression per read: its C is as before)."""
    rng = np.random.default_rng(29)
    nodes, inputs, inits = _maxpool_relu(rng, [2, 3, 6, 6], 2, 2)
    stds = {"b.std": np.full(inits["b"].shape, 0.1, np.float32)}
    host = "\n".join(_kernel_bodies(tmp_path, nodes, inputs, inits, stds))
    assert "float maxpool_element_1_v0_ptr[" in host and "float maxpool_element_1_v1_ptr[" in host, host
    assert not re.search(r"2\.0+e\+00f <= \(\(\w+\) > \(\w+\)", host), host
    assert re.search(r"2\.0+e\+00f <= maxpool_distance_\d+_ptr\[", host), host
    m4 = "\n".join(_kernel_bodies(tmp_path, nodes, inputs, inits, stds, target="cortex-m4"))
    assert "maxpool_element" not in m4 and "maxpool_distance" not in m4, m4
