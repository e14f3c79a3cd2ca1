"""The state pfpc keeps in the IR, typed: the ``pfp.*`` attributes are read and written only here.

On ``main`` (a Relax function whose first ``num_input`` parameters are the model inputs and the
rest weights):

| attribute | Python value | set by |
|---|---|---|
| ``pfp.params`` | parameter name -> weight mean (float32 array), one per weight parameter | import; every pass that changes weights |
| ``pfp.weight_var`` | parameter name -> weight variance, stochastic weights only | import (removed by `SubstituteLayers`, whose variances are parameters) |
| ``pfp.onnx_names`` | parameter name -> ONNX initializer it comes from | import, the weight-folding passes |
| ``pfp.weight_positions`` | parameter name -> the flat position in its ONNX initializer of every element (int64, the parameter's shape), or None (stored empty) where a pass changed the values; a weight without an entry is the initializer as imported | the weight-folding passes (provenance: `SharedDraws` reads it) |
| ``pfp.onnx_nodes`` | binding name -> the `OnnxNode`s it computes (provenance until kernels carry it in their `KernelSpec`) | import, kept by `ir.MainRewriter` (removed by `SubstituteLayers`) |
| ``pfp.sampled_std`` | parameter name -> weight std drawn per sample | `DetachWeightStd` (mode svi) |
| ``pfp.outputs`` | the `Moment` of each model output (``main`` returns mean [+ moment] per output) | `SubstituteLayers`, the kernel-rewriting passes |
| ``pfp.output_softmax`` | [{"output": index, "function": name, "axis": int}] of dropped softmaxes | `SubstituteLayers` |
| ``pfp.extra_outputs`` | the predictive outputs appended after the Gaussian ones | `AppendPredictiveOutputs` |
| ``pfp.predictive`` | (probability method, logit draws) of those outputs and of the softmax outputs; once set, ``main`` also returns the value of every ``pfp.output_softmax`` output after the extra outputs | `AppendPredictiveOutputs` |
| ``pfp.covariance`` | {"option", "mode", "budget", "convolutions"}: the per-channel loadings made (absent: none); mode "shared_scale" also "dense", "nodes", "noise_ratio", "estimated_extra" | `CarryChannelCovariance`, `ShareDenseScale` |

On a Gaussian kernel (a PrimFunc): ``pfp.kernel``, its `KernelSpec` (stored as JSON text, the
form TVM prints and serialises; `kernel_spec` parses it); ``pfp.placeholder`` on a kernel the
passes emitted without its body (`ops.kernel.placeholder_kernel`: its parameters and spec are the
built kernel's; `is_placeholder`), built before code generation (`ir.build_kernels`).

`check_module` is the well-formedness check of this state (the tests run it after every pass).
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from .errors import PfpcError
from .ops import registry
from .ops.gaussian import Moment
from .ops.kernel import KERNEL_ATTR, PLACEHOLDER_ATTR, KernelSpec, OnnxNode, is_placeholder  # noqa: F401

PARAMS = "pfp.params"
WEIGHT_VAR = "pfp.weight_var"
ONNX_NAMES = "pfp.onnx_names"
SAMPLED_STD = "pfp.sampled_std"
WEIGHT_POSITIONS = "pfp.weight_positions"
OUTPUTS = "pfp.outputs"
OUTPUT_SOFTMAX = "pfp.output_softmax"
EXTRA_OUTPUTS = "pfp.extra_outputs"
PREDICTIVE = "pfp.predictive"
ONNX_NODES = "pfp.onnx_nodes"
COVARIANCE = "pfp.covariance"
KERNEL = KERNEL_ATTR
PLACEHOLDER = PLACEHOLDER_ATTR


def _has(func, key) -> bool:
    return func.attrs is not None and key in func.attrs


def _arrays(func, key) -> dict[str, np.ndarray]:
    return {str(k): v.numpy() for k, v in func.attrs[key].items()} if _has(func, key) else {}


def means(func) -> dict[str, np.ndarray]:
    """``pfp.params``: weight parameter name -> mean."""
    return _arrays(func, PARAMS)


def variances(func) -> dict[str, np.ndarray]:
    """``pfp.weight_var``: parameter name -> variance (stochastic weights, before substitution)."""
    return _arrays(func, WEIGHT_VAR)


def sampled_std(func) -> dict[str, np.ndarray]:
    return _arrays(func, SAMPLED_STD)


def is_sampled_network(func) -> bool:
    """Whether ``main`` is mode svi's deterministic network (`DetachWeightStd` set ``pfp.sampled_std``)."""
    return _has(func, SAMPLED_STD)


def onnx_names(func) -> dict[str, str]:
    return {str(k): str(v) for k, v in func.attrs[ONNX_NAMES].items()} if _has(func, ONNX_NAMES) else {}


def onnx_name(names: dict, param: str) -> str:
    """The ONNX initializer of a weight parameter: its own entry, else its source's (the name up to
    the last '.': ``fc.weight.var`` -> ``fc.weight``), else the parameter name."""
    return names.get(param, names.get(param.rsplit(".", 1)[0], param))


def onnx_nodes(func) -> dict[str, tuple[OnnxNode, ...]]:
    """``pfp.onnx_nodes``: binding name -> the ONNX nodes it computes (before `SubstituteLayers`)."""
    if not _has(func, ONNX_NODES):
        return {}
    return {name: tuple(OnnxNode(int(i), str(n), str(o)) for i, n, o in nodes) for name, nodes in json.loads(str(func.attrs[ONNX_NODES])).items()}


def _encode_nodes(value: dict) -> str:
    return json.dumps({name: [[n.index, n.name, n.op_type] for n in nodes] for name, nodes in value.items()}, sort_keys=True)


def weight_positions(func) -> dict[str, np.ndarray | None]:
    """``pfp.weight_positions`` (None: values changed at compile time, no positions)."""
    return {name: (None if value.size == 0 else value) for name, value in _arrays(func, WEIGHT_POSITIONS).items()}


def source_positions(positions: dict, param: str, shape) -> np.ndarray | None:
    """Where the elements of weight ``param`` come from in its initializer: the flat positions
    (the identity for a weight as imported), None where a pass changed its values."""
    if param in positions:
        return positions[param]
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def output_moments(func) -> list[Moment]:
    return [Moment(str(r)) for r in func.attrs[OUTPUTS]]


def output_softmax(func) -> list[dict]:
    return json.loads(str(func.attrs[OUTPUT_SOFTMAX])) if _has(func, OUTPUT_SOFTMAX) else []


def extra_outputs(func) -> list[str]:
    return [str(e) for e in func.attrs[EXTRA_OUTPUTS]] if _has(func, EXTRA_OUTPUTS) else []


def predictive(func) -> tuple[str, int] | None:
    """(method, logit draws) of the predictive outputs, or None when there are none."""
    if not _has(func, PREDICTIVE):
        return None
    method, samples = (str(v) for v in func.attrs[PREDICTIVE])
    return method, int(samples)


def covariance(func) -> dict | None:
    """``pfp.covariance``: what `CarryChannelCovariance` did, or None when it made no loadings."""
    return json.loads(str(func.attrs[COVARIANCE])) if _has(func, COVARIANCE) else None


#: Parsed specs by their text: the kernel-rewriting passes read every kernel's spec several times
#: (1,000-node chain: 7,900 parses of 3,100 texts, 1 s). A `KernelSpec` is immutable.
_SPECS: dict = {}


def kernel_spec(prim) -> KernelSpec | None:
    """The spec of a Gaussian kernel PrimFunc, else None."""
    if not _has(prim, KERNEL):
        return None
    text = str(prim.attrs[KERNEL])
    if text not in _SPECS:
        if len(_SPECS) >= 20000:
            _SPECS.clear()
        _SPECS[text] = KernelSpec.from_json(text)
    return _SPECS[text]


def with_kernel_spec(prim, spec: KernelSpec):
    return prim.with_attr(KERNEL, spec.to_json())


def _tensors(values: dict):
    return {name: tvm.runtime.tensor(np.ascontiguousarray(value, np.float32)) for name, value in values.items()}


_UNSET = object()


def _positions(values: dict):
    return {name: tvm.runtime.tensor(np.zeros(0, np.int64) if value is None else np.ascontiguousarray(value, np.int64))
            for name, value in values.items()}


def encode(*, means=_UNSET, variances=_UNSET, onnx_names=_UNSET, sampled_std=_UNSET, outputs=_UNSET,
           output_softmax=_UNSET, extra_outputs=_UNSET, weight_positions=_UNSET, predictive=_UNSET, onnx_nodes=_UNSET,
           covariance=_UNSET) -> dict:
    """The given state as ``{attribute: TVM value}`` (None: remove the attribute), for `ir.func_attrs`."""
    encoders = {
        PARAMS: (means, _tensors),
        WEIGHT_VAR: (variances, _tensors),
        SAMPLED_STD: (sampled_std, _tensors),
        WEIGHT_POSITIONS: (weight_positions, _positions),
        ONNX_NAMES: (onnx_names, dict),
        OUTPUTS: (outputs, lambda reprs: [str(Moment(r)) for r in reprs]),
        OUTPUT_SOFTMAX: (output_softmax, json.dumps),
        EXTRA_OUTPUTS: (extra_outputs, list),
        PREDICTIVE: (predictive, lambda value: [str(value[0]), str(value[1])]),
        ONNX_NODES: (onnx_nodes, _encode_nodes),
        COVARIANCE: (covariance, lambda value: json.dumps(value, sort_keys=True)),
    }
    return {key: (None if value is None else encoder(value)) for key, (value, encoder) in encoders.items() if value is not _UNSET}


# --- well-formedness ------------------------------------------------------------------------------
def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _fits(array: np.ndarray, shape: list) -> bool:
    """Whether a stored array has a parameter's shape (a 0-d weight is stored as [1]: TVM tensors
    are made with np.ascontiguousarray, which returns at least one dimension)."""
    return list(array.shape) == shape or (shape == [] and array.size == 1)


def check_module(mod: tvm.IRModule) -> None:
    """Raise PfpcError naming the first inconsistency of pfpc's IR state in ``mod``: every weight
    parameter has a mean of its shape and nothing else has one; variances and stds belong to weights,
    have their shapes and are non-negative float32; every Gaussian kernel's spec names registry
    operators and matches its call (arguments, results); ``pfp.outputs`` matches what ``main``
    returns. Checks the state, not the math (that is tests/reference.py's job)."""
    func = mod["main"]
    if func.attrs is None or "num_input" not in func.attrs or not _has(func, PARAMS):
        raise PfpcError("ill-formed IR: main has no num_input or pfp.params")
    num_input = int(func.attrs["num_input"])
    weights = {p.name: _shape(p) for p in func.params[num_input:]}
    stored = means(func)
    if set(stored) != set(weights):
        raise PfpcError(f"ill-formed IR: weight parameters {sorted(set(weights) - set(stored))} have no pfp.params entry, "
                        f"pfp.params entries {sorted(set(stored) - set(weights))} no parameter")
    for key, values in ((PARAMS, stored), (WEIGHT_VAR, variances(func)), (SAMPLED_STD, sampled_std(func))):
        for name, value in values.items():
            if name not in weights or not _fits(value, weights[name]):
                raise PfpcError(f"ill-formed IR: {key}['{name}'] has shape {list(value.shape)}, its parameter "
                                f"{weights.get(name, 'does not exist')}")
            if value.dtype != np.float32 or (key != PARAMS and np.any(value < 0)):  # NaN and inf are the model's business
                raise PfpcError(f"ill-formed IR: {key}['{name}'] is not{'' if key == PARAMS else ' non-negative'} float32")
    for name, value in weight_positions(func).items():
        if name not in weights or (value is not None and not _fits(value, weights[name])):
            raise PfpcError(f"ill-formed IR: {WEIGHT_POSITIONS}['{name}'] does not match a weight parameter")
    kernels = 0
    for block in func.body.blocks:
        for binding in block.bindings:
            kernels += _check_kernel_call(mod, binding)
    bound = {binding.var.name for block in func.body.blocks for binding in block.bindings}
    stray = sorted(set(onnx_nodes(func)) - bound)
    if stray:
        raise PfpcError(f"ill-formed IR: {ONNX_NODES} names {stray}, which main does not bind")
    if _has(func, OUTPUTS):
        _check_outputs(func)
    elif kernels:
        raise PfpcError("ill-formed IR: main calls Gaussian kernels but has no pfp.outputs")


def _check_kernel_call(mod, binding) -> int:
    value = binding.value
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir"):
        return 0
    gvar = value.args[0]
    spec = kernel_spec(mod[gvar])
    if spec is None:
        return 0
    where = f"ill-formed IR: kernel {gvar.name_hint}"
    if spec.nodes and len(spec.nodes) != len(spec.stages):
        raise PfpcError(f"{where}: provenance of {len(spec.nodes)} stages for {len(spec.stages)} stages")
    unknown = [op for op in spec.ops if op not in registry.STAGES]
    if unknown:
        raise PfpcError(f"{where}: unknown stage(s) {unknown}")
    reprs = list(spec.operands) + [spec.output]
    if any(r not in Moment.__members__.values() for r in reprs):
        raise PfpcError(f"{where}: moment kinds {reprs} are not all of {[str(m) for m in Moment]}")
    if spec.operand_count() != len(spec.operands):
        raise PfpcError(f"{where}: its stages take {spec.operand_count()} operands, the spec lists {len(spec.operands)}")
    args = len(value.args[1].fields)
    wanted = sum(1 if r == Moment.NONE else 2 for r in spec.operands)
    if args != wanted:
        raise PfpcError(f"{where}: called with {args} tensors, its operands {list(spec.operands)} take {wanted}")
    results = len(binding.var.ty.fields) if isinstance(binding.var.ty, relax.TupleType) else 1
    if results != (1 if spec.output == Moment.NONE else 2):
        raise PfpcError(f"{where}: returns {results} tensors for output moment '{spec.output}'")
    return 1


def _check_outputs(func):
    reprs = [str(r) for r in func.attrs[OUTPUTS]]
    if any(r not in (Moment.NONE, Moment.VAR) for r in reprs):
        raise PfpcError(f"ill-formed IR: pfp.outputs {reprs}: an output is a mean and, unless deterministic, a variance")
    body = func.body.body
    fields = None
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Tuple) and binding.var.same_as(body):
                fields = binding.value.fields
    fields = fields if fields is not None else (body.fields if isinstance(body, relax.Tuple) else [body])
    values = len(output_softmax(func)) if predictive(func) is not None else 0  # softmax outputs' values, once computed
    wanted = sum(1 if r == Moment.NONE else 2 for r in reprs) + len(extra_outputs(func)) + values
    if len(fields) != wanted:
        raise PfpcError(f"ill-formed IR: main returns {len(fields)} tensors, pfp.outputs {reprs}, "
                        f"pfp.extra_outputs {extra_outputs(func)} and {values} softmax output value(s) say {wanted}")
    for entry in output_softmax(func):
        if not 0 <= int(entry["output"]) < len(reprs):
            raise PfpcError(f"ill-formed IR: pfp.output_softmax names output {entry['output']} of {len(reprs)}")


@tvm.instrument.pass_instrument
class CheckAfterEachPass:
    """Runs `check_module` after every pfpc pass run in the PassContext it is installed in
    (``tvm.transform.PassContext(instruments=[CheckAfterEachPass()])``: the tests install it)."""

    def run_after_pass(self, mod, info):
        if info.name.startswith("pfpc.") and "main" in [gvar.name_hint for gvar in mod.get_global_vars()]:
            try:
                check_module(mod)
            except PfpcError as err:
                raise PfpcError(f"after {info.name}: {err}") from None
