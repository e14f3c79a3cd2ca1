"""Shared test utilities: build small ONNX models, compile them, run the generated C."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import pfpc.compiler as compiler


def make_model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value if np.asarray(value).dtype.kind == "i" else np.asarray(value, np.float32), name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def random_std(initializers, rng, scale=0.3):
    """A posterior std per initializer, proportional to the weights' typical size."""
    return {f"{name}.std": (scale * (np.abs(value) + 0.05) * rng.uniform(0.2, 1.0, value.shape)).astype(np.float32)
            for name, value in initializers.items() if np.asarray(value).dtype == np.float32}


def compile_and_run(model, posterior, inputs, tmp_path, name="out"):
    out_dir = str(tmp_path / name)
    compiler.compile(model, posterior, out_dir=out_dir)
    return compiler.run_host(out_dir, inputs)
