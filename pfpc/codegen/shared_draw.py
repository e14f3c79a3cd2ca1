"""Shared-draw semantics of a shared posterior: one noise draw per component, in the linear kernels.

With ``semantics = "shared_draw"`` every weight of a component uses the same standard normal
draw: w_i = mu_i + a_i eps_c(i), a_i its (signed) std. A linear output then needs, besides the
usual per-weight sums, one grouped sum per component (`ops.gaussian._reduce_shared_draw`). The
kernels therefore need, for their weight operand in its final layout, the component of every
weight (-1 for weights drawn on their own: blends and exceptions) and a_i.

The passes move weights around (transposes, reshapes) before the kernels see them. `trace`
finds where every weight went by compiling the model once more with each covered initializer's
values replaced by their flat position + 1 (exact in float32): the final mean arrays then hold
the source positions. A weight that the passes scale (batch-norm folding, a constant factor)
has no integer trace and is refused with one line: its draws would need the scale as well.
`rewrite` then rebuilds every linear kernel that reads a covered weight with the two extra
operands (`ops.kernel.arity`: a linear stage with ``draw_groups`` takes them after the weight).

The outputs of a layer become correlated through the shared draws (every output unit reads the
same eps); the PFP keeps only per-unit variances, as it ignores the other correlations between
units. Elementwise uses of a covered weight need nothing: each output reads one weight, whose
marginal is unchanged.
"""

from __future__ import annotations

import numpy as np

from ..errors import PfpcError
from ..frontends.shared_posterior import expand_tensor
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec
from ..ops.registry import LINEAR_OPS
from .program import Tensor

#: Components per covered initializer a shared-draw kernel accumulates separately (one register each).
MAX_DRAW_GROUPS = 64


def tracer_means(shared) -> dict:
    """Initializer -> its flat positions + 1 in its shape (float32, exact below 2^24)."""
    return {name: (np.arange(tensor.size, dtype=np.float64) + 1).astype(np.float32).reshape(tensor.shape)
            for name, tensor in shared.tensors.items()}


def trace(final_means: dict, onnx_names: dict, shared) -> dict:
    """Parameter -> source flat positions (int64, the parameter's shape) for every final mean
    array of the tracer compile that is a permutation of a covered initializer's positions; None
    for one whose values the passes changed."""
    traced = {}
    for param, values in final_means.items():
        source = onnx_names.get(param, onnx_names.get(param.rsplit(".", 1)[0], param))
        if source not in shared.tensors:
            continue
        positions = np.asarray(values, np.float64) - 1
        moved = np.array_equal(np.sort(positions.reshape(-1)), np.arange(shared.tensors[source].size))  # a permutation
        traced[param] = positions.astype(np.int64) if moved else None
    return traced


def draw_arrays(tensor) -> tuple[np.ndarray, np.ndarray]:
    """(group, signed std) per weight, flat, in the initializer's layout: the component, or -1
    for blends and exceptions (drawn on their own); the std times the sign of the channel scale."""
    groups = tensor.component_index.reshape(-1).astype(np.int64)
    for positions in (tensor.blend_position, tensor.exception_position):
        if positions is not None:
            groups[positions] = -1
    _, sigma = expand_tensor(tensor)
    if tensor.channel_scale is not None:
        view = [1] * len(tensor.shape)
        view[tensor.channel_axis] = -1
        sigma = sigma * np.sign(tensor.channel_scale.astype(np.float64)).reshape(view)
    return groups, sigma.reshape(-1)


def rewrite(program, prim_funcs: dict, traced: dict, shared) -> None:
    """Give every linear kernel that reads a covered weight its draw groups and coefficients."""
    from .shared_weights import drop_unused, operand_info, operand_slices, rebuild

    built, extra = {}, {}
    for step in program.steps:
        spec = step.spec
        if spec is None or spec.ops[0] not in LINEAR_OPS:
            continue
        slices = operand_slices(spec)
        first = step.args[slices[0]][0]
        if first.kind == "weight" and program.weights[first.c_name][1] in shared.tensors:
            raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{program.weights[first.c_name][1]}' is the first "
                            f"operand of a {spec.ops[0]}; only the weight operand of a layer can share draws")
        weight = step.args[slices[1]][0]
        source = program.weights[weight.c_name][1] if weight.kind == "weight" else None
        if source not in shared.tensors:
            continue
        tensor = shared.tensors[source]
        positions = traced.get(weight.param)
        if positions is None:
            raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{source}' is scaled at compile time "
                            "(batch-norm folding or a constant factor); its shared draws cannot be propagated")
        if tensor.components > MAX_DRAW_GROUPS:
            raise PfpcError(f"shared posterior (semantics 'shared_draw'): weight '{source}' has {tensor.components} components; "
                            f"shared draws are propagated for at most {MAX_DRAW_GROUPS} per tensor")
        if id(weight) not in extra:
            groups, coeff = draw_arrays(tensor)
            extra[id(weight)] = []
            for suffix, values in (("draw_group", groups), ("draw_std", coeff)):
                array = values[positions].astype(np.float32)
                new = Tensor(program.namer(f"{weight.c_name}_{suffix}"), list(array.shape), "weight")
                program.weights[new.c_name] = (array, source)  # stored as a codebook too (few distinct values)
                extra[id(weight)].append(new)
        names, shapes = operand_info(spec, prim_funcs[step.kernel])
        names[2:2] = [f"{names[1]}_draw_group", f"{names[1]}_draw_std"]
        shapes[2:2] = [shapes[1], shapes[1]]
        stages = ((spec.stages[0][0], {**spec.stages[0][1], "draw_groups": tensor.components}),) + spec.stages[1:]
        step.args = step.args[: slices[1].stop] + extra[id(weight)] + step.args[slices[1].stop :]
        rebuild(step, prim_funcs, program.namer, KernelSpec(stages, spec.operands[:2] + (Moment.NONE, Moment.NONE) + spec.operands[2:], spec.output),
                names, shapes, built, "shared_draw")
    drop_unused(program, prim_funcs)
