"""Each Gaussian operator of the operator-coverage set, compiled to C, against the NumPy
reference (tests/reference.py) and onnxruntime (zero variance), and the nonlinear ones against
Monte Carlo sampling with onnxruntime."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from onnx import helper

import reference
from helpers import check_against_reference, compile_and_run, make_model, random_std

X4 = [2, 4, 6, 6]


def _w(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _conv(out="c", x="x", w="w"):
    """A stochastic 3x3 conv, so the operator under test sees a Gaussian input."""
    return helper.make_node("Conv", [x, w], [out], pads=[1, 1, 1, 1])


def _conv_case(rng, nodes, extra=None, stochastic=("w",), opset=17, in_shape=X4):
    inits = {"w": _w(rng, 4, in_shape[1], 3, 3), **(extra or {})}
    return nodes, [("x", in_shape)], inits, list(stochastic), opset


def _bn_params(rng, channels=4):
    return {
        "gamma": rng.uniform(0.5, 2.0, channels).astype(np.float32) * rng.choice([-1, 1], channels).astype(np.float32),
        "beta": _w(rng, channels),
        "mean": _w(rng, channels),
        "var": rng.uniform(0.2, 2.0, channels).astype(np.float32),
    }


BN = ["gamma", "beta", "mean", "var"]


def _cases():
    """name -> builder(rng) -> (nodes, inputs, initializers, stochastic initializers, opset)."""
    node = helper.make_node
    cases = {
        "avgpool_2x2": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]),
        "avgpool_pads_exclude": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]),
        "avgpool_pads_include_ceil": lambda r: _conv_case(r, [_conv(), node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=1, ceil_mode=1)]),
        "global_avgpool": lambda r: _conv_case(r, [_conv(), node("GlobalAveragePool", ["c"], ["y"])]),
        "batchnorm_folded": lambda r: _conv_case(r, [_conv(), node("BatchNormalization", ["c", *BN], ["y"])], _bn_params(r), ("w", "beta")),
        "batchnorm_folded_bias": lambda r: _conv_case(
            r, [node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("BatchNormalization", ["c", *BN], ["y"], epsilon=1e-3)],
            {**_bn_params(r), "b": _w(r, 4)}, ("w", "b", "beta")),
        "batchnorm_affine": lambda r: _conv_case(r, [_conv(), node("Relu", ["c"], ["h"]), node("BatchNormalization", ["h", *BN], ["y"])], _bn_params(r), ("w", "beta")),
        "batchnorm_gemm": lambda r: ([node("Gemm", ["x", "w", "b"], ["h"], transB=1), node("BatchNormalization", ["h", *BN], ["y"])],
                                     [("x", [3, 5])], {"w": _w(r, 4, 5), "b": _w(r, 4), **_bn_params(r)}, ["w", "b", "beta"], 17),
        "mul_per_channel": lambda r: _conv_case(r, [_conv(), node("Mul", ["c", "k"], ["y"])], {"k": _w(r, 4, 1, 1)}),
        "mul_scalar": lambda r: _conv_case(r, [_conv(), node("Mul", ["k", "c"], ["y"])], {"k": np.array(-1.5, np.float32)}),
        "mul_two_gaussians": lambda r: _conv_case(r, [_conv(), _conv("d", w="w2"), node("Mul", ["c", "d"], ["y"])], {"w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "mul_stochastic_weight": lambda r: _conv_case(r, [_conv(), node("Mul", ["c", "k"], ["y"])], {"k": _w(r, 1, 4, 1, 1)}, ("w", "k")),
        "sub_constant": lambda r: _conv_case(r, [_conv(), node("Sub", ["c", "k"], ["y"])], {"k": _w(r, 4, 1, 1)}),
        "sub_from_constant": lambda r: _conv_case(r, [_conv(), node("Sub", ["k", "c"], ["y"])], {"k": np.array(2.0, np.float32)}),
        "div_per_channel": lambda r: _conv_case(r, [_conv(), node("Div", ["c", "k"], ["y"])], {"k": r.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32)}),
        "div_scalar": lambda r: _conv_case(r, [_conv(), node("Div", ["c", "k"], ["y"])], {"k": np.array(4.0, np.float32)}),
        "sum_of_three": lambda r: _conv_case(r, [_conv(), _conv("d", w="w2"), node("Sum", ["c", "d", "x"], ["y"])], {"w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "add_of_two_gaussians": lambda r: _conv_case(r, [_conv(), _conv("d", w="w2"), node("Add", ["c", "d"], ["y"])], {"w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "concat": lambda r: _conv_case(r, [_conv(), node("Relu", ["c"], ["h"]), node("Concat", ["h", "x", "c"], ["y"], axis=1)]),
        "transpose": lambda r: _conv_case(r, [_conv(), node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1])]),
        "squeeze_unsqueeze_flatten": lambda r: _conv_case(r, [
            _conv(), node("Unsqueeze", ["c", "axes"], ["u"]), node("Squeeze", ["u", "axes"], ["s"]), node("Flatten", ["s"], ["y"])],
            {"axes": np.array([2], np.int64)}),
        "pad_zero": lambda r: _conv_case(r, [_conv(), node("Pad", ["c", "pads"], ["y"])], {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64)}),
        "pad_value": lambda r: _conv_case(r, [_conv(), node("Pad", ["c", "pads", "value"], ["p"]), _conv("y", x="p", w="w2")],
                                          {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "value": np.array(0.5, np.float32), "w2": _w(r, 4, 4, 3, 3)}, ("w", "w2")),
        "relu6_clip": lambda r: _conv_case(r, [_conv(), node("Clip", ["c", "lo", "hi"], ["y"])], {"lo": np.array(0.0, np.float32), "hi": np.array(1.0, np.float32)}),
        "clip_opset10": lambda r: _conv_case(r, [_conv(), node("Clip", ["c"], ["y"], min=-0.5, max=0.5)], opset=10),
        "clip_lower_only": lambda r: _conv_case(r, [_conv(), node("Clip", ["c", "lo"], ["y"])], {"lo": np.array(-0.3, np.float32)}),
        "leaky_relu": lambda r: _conv_case(r, [_conv(), node("LeakyRelu", ["c"], ["y"], alpha=0.1)]),
        "prelu": lambda r: _conv_case(r, [_conv(), node("PRelu", ["c", "slope"], ["y"])], {"slope": r.uniform(-0.5, 0.5, (4, 1, 1)).astype(np.float32)}),
        "sigmoid": lambda r: _conv_case(r, [_conv(), node("Sigmoid", ["c"], ["y"])]),
        "tanh": lambda r: _conv_case(r, [_conv(), node("Tanh", ["c"], ["y"])]),
        "conv1d_maxpool1d": lambda r: ([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1], strides=[1]),
                                        node("MaxPool", ["c"], ["y"], kernel_shape=[3], strides=[2], pads=[1, 1])],
                                       [("x", [2, 3, 11])], {"w": _w(r, 4, 3, 3), "b": _w(r, 4)}, ["w", "b"], 17),
        "conv1d_avgpool1d_gap": lambda r: ([node("Conv", ["x", "w"], ["c"], dilations=[2], group=1), node("AveragePool", ["c"], ["p"], kernel_shape=[2], strides=[2]),
                                            node("GlobalAveragePool", ["p"], ["y"])],
                                           [("x", [2, 3, 12])], {"w": _w(r, 4, 3, 3)}, ["w"], 17),
        "batch_matmul": lambda r: ([node("MatMul", ["x", "w"], ["h"]), node("Relu", ["h"], ["r"]), node("MatMul", ["r", "w2"], ["y"])],
                                   [("x", [2, 3, 4, 5])], {"w": _w(r, 3, 5, 6), "w2": _w(r, 1, 6, 2)}, ["w", "w2"], 17),
    }
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_reference(tmp_path, zero_var, case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    nodes, inputs, inits, stochastic, opset = CASES[case](rng)
    model = make_model(nodes, inputs, ["y"], inits, opset=opset)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in inputs}
    check_against_reference(model, inits, feeds, tmp_path, rng, zero_var, stochastic=stochastic)
