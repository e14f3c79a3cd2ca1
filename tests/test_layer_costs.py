"""The report's MACs are the model's (counted here from the ONNX graph), whatever kernels the
covariance form adds: its window sums and loadings are PFP work, not MACs."""

import onnx
import numpy as np

import pfpc
import test_covariance as TC
from pfpc.codegen.footprint import layer_costs


def _onnx_macs(model) -> int:
    """Conv: output elements x Cin/groups x kh x kw; Gemm / MatMul: batch rows x weight elements."""
    model = onnx.shape_inference.infer_shapes(model)
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in list(model.graph.value_info) + list(model.graph.output)}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            _, cin_per_group, kh, kw = weights[node.input[1]]
            total += int(np.prod(shapes[node.output[0]])) * cin_per_group * kh * kw
        elif node.op_type in ("Gemm", "MatMul"):
            total += int(np.prod(weights[node.input[1]])) * shapes[node.output[0]][0]
    return total


def test_covariance_kernels_add_work_not_macs():
    model, stds, _ = TC._onnx(TC.TinyResNet)
    posterior = {name + ".std": std for name, std in stds.items()}
    carried = pfpc.compile(model, posterior, batch=1, covariance="channel")
    diagonal = pfpc.compile(model, posterior, batch=1, covariance="none")
    assert carried.program.covariance
    with_loadings, without = layer_costs(carried.program), layer_costs(diagonal.program)
    expected = _onnx_macs(model)
    assert sum(layer["macs"] for layer in with_loadings) == sum(layer["macs"] for layer in without) == expected
    assert sum(layer["pfp_fma"] for layer in with_loadings) > sum(layer["pfp_fma"] for layer in without)
