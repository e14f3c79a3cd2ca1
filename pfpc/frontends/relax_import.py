"""Import the checked ONNX model into Relax, weights as named function parameters.

The result is the deterministic posterior-mean network as TVM's ONNX importer produces it, with
two function attributes the passes read:

- ``pfp.params``: parameter name -> weight mean (every parameter after ``num_input``);
- ``pfp.weight_var``: parameter name -> weight variance, for stochastic weights only;
- ``pfp.onnx_names``: parameter name -> ONNX initializer name (for messages and C comments).
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from tvm.relax.frontend.onnx import from_onnx

from ..errors import PfpcError
from .onnx_model import graph_inputs, input_shapes
from .posterior import Posterior

#: ONNX operators with a Gaussian counterpart, and operators that only compute shapes.
GAUSSIAN_OPS = {"MatMul", "Gemm", "Add", "Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Identity", "Dropout", "Transpose"}
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Cast", "Squeeze", "Slice", "Constant"}


def check_supported(model: onnx.ModelProto, name: str) -> None:
    """Raise one error that lists every unsupported node (name and op type)."""
    unsupported = [
        f"{node.name or node.output[0]} ({node.op_type})"
        for node in model.graph.node
        if node.op_type not in GAUSSIAN_OPS | SHAPE_OPS or node.domain not in ("", "ai.onnx")
    ]
    if unsupported:
        raise PfpcError(f"{name}: {len(unsupported)} unsupported node(s): " + ", ".join(unsupported))


def import_model(model: onnx.ModelProto, posterior: Posterior, name: str = "model") -> tvm.IRModule:
    check_supported(model, name)
    model = _integer_initializers_as_constants(model)
    try:
        mod = from_onnx(model, shape_dict=input_shapes(model), keep_params_in_input=True)
    except PfpcError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PfpcError(f"{name}: TVM's ONNX importer fails: {first}") from None
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    if num_input != len(graph_inputs(model)):
        raise PfpcError(f"{name}: expected {len(graph_inputs(model))} inputs, the importer made {num_input}")
    weight_params = list(func.params[num_input:])
    onnx_by_relax = _match_initializers(model, weight_params, name)
    params, variances = {}, {}
    for param in weight_params:
        onnx_name = onnx_by_relax[param.name]
        mean = posterior.means.get(onnx_name)
        if mean is None:
            raise PfpcError(f"{name}: weight '{onnx_name}' is not float32")
        params[param.name] = tvm.runtime.tensor(np.ascontiguousarray(mean, np.float32))
        if onnx_name in posterior.variances:
            variances[param.name] = tvm.runtime.tensor(np.ascontiguousarray(posterior.variances[onnx_name]))
    func = func.without_attr("params")
    func = func.with_attr("pfp.params", params).with_attr("pfp.weight_var", variances)
    mod["main"] = func.with_attr("pfp.onnx_names", onnx_by_relax)
    return mod


def _match_initializers(model, weight_params, name):
    """Map Relax parameter names back to ONNX initializer names (same order, sanitised names)."""
    used = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    mapping = {}
    if len(used) < len(weight_params):
        raise PfpcError(f"{name}: the importer made more weight parameters than there are initializers")
    for param in weight_params:
        shape = [int(d) for d in param.ty.shape]
        candidates = [init for init in used if _sanitize(init.name) == param.name or init.name == param.name]
        if not candidates:
            raise PfpcError(f"{name}: cannot match imported parameter '{param.name}' to an initializer")
        init = candidates[0]
        if list(init.dims) != shape:
            raise PfpcError(f"{name}: parameter '{param.name}' has shape {shape}, initializer '{init.name}' {list(init.dims)}")
        used.remove(init)
        mapping[param.name] = init.name
    return mapping


def _sanitize(text):
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)
    return out if out and not out[0].isdigit() else "_" + out


def _integer_initializers_as_constants(model):
    """Shapes and axes are compile-time constants, not weights: make them Constant nodes so the
    importer folds them instead of turning them into parameters."""
    integer = [init for init in model.graph.initializer if init.data_type != onnx.TensorProto.FLOAT]
    if not integer:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [init for init in copy.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(keep)
    constants = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in integer]
    nodes = constants + list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy
