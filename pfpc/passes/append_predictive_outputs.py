"""Append the predictive outputs firmware acts on after the logits (chosen at compile time).

    return (logits_mean, logits_var)
        ->  probs   = R.call_tir(logits_probs, (logits_mean, logits_var), [N, K])
            entropy = R.call_tir(logits_entropy, (logits_mean, logits_var), [N])
            mi      = R.call_tir(logits_mutual_information, (logits_mean, logits_var), [N])
            return (logits_mean, logits_var, probs, entropy, mi)

for the requested subset of ``probs``, ``entropy``, ``mutual_information``, ``logit_var``, ``ood``,
``log_entropy``, ``log_mutual_information`` (formulas and the probability ``method``: `pfpc.ops.predictive`), always in that order. The model
must have one [N, K] output; deterministic logits (no variance) give softmax probabilities and
zero mutual information and logit variance. The chosen outputs are recorded in the function
attribute ``pfp.extra_outputs``, the method and draws in ``pfp.predictive``; code generation gives
each output its own buffer. Runs last: the kernel-rewriting passes know only the Gaussian outputs.

A model output that was a softmax (or log-softmax) of its logits (``pfp.output_softmax``, recorded
by `SubstituteLayers`, which returns the logits' moments there) gets its value back, by the same
method, after those:

    return (logits_mean, logits_var)      # output 0 was y = Softmax(logits, axis)
        ->  view = R.reshape(logits_*, [O, K] or [O, K, I])     # K: the softmax axis
            y = R.reshape(R.call_tir(logits_softmax, view), shape of y)
            return (logits_mean, logits_var, <extras>, y)

so every output means what the ONNX model says (with zero variance it is the model's output) and
the logits' moments stay available beside it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..errors import PfpcError
from .. import ir_state
from ..ir import MainRewriter, func_attrs, output_fields, shape_of
from ..ops.gaussian import Moment
from ..ops.predictive import (DEFAULT_METHOD, DEFAULT_OUTPUTS, DEFAULT_SAMPLES, MAX_SAMPLES, METHODS, PREDICTIVE_OUTPUTS, build_predictive_kernel,
                              output_function_kernel)


def check_outputs(outputs) -> tuple:
    """The requested outputs in canonical order; one-line error for an unknown name."""
    unknown = [name for name in outputs if name not in PREDICTIVE_OUTPUTS]
    if unknown:
        raise PfpcError(f"--outputs: unknown output(s) {', '.join(unknown)} (choose from {', '.join(PREDICTIVE_OUTPUTS)})")
    return tuple(name for name in PREDICTIVE_OUTPUTS if name in outputs)


def check_method(method, samples) -> tuple:
    """(method, draws) checked; one-line errors."""
    if method not in METHODS:
        raise PfpcError(f"--probs-method: unknown method '{method}' (choose from {', '.join(METHODS)})")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 2 <= samples <= MAX_SAMPLES:
        raise PfpcError(f"--logit-samples: {samples!r} must be an integer from 2 to {MAX_SAMPLES}")
    return method, samples


class _Append(MainRewriter):
    def __init__(self, mod, outputs, method, samples):
        super().__init__(mod)
        self.outputs, self.method, self.samples = outputs, method, samples
        # the deterministic network of mode svi (weight stds set aside): each sample's softmax is
        # averaged by the generated code, a log-softmax output takes the log of that average
        self.sampled_network = ir_state.is_sampled_network(self.func)

    def output(self, body):
        fields = [self.remap(field) for field in output_fields(self.func)]
        reprs = ir_state.output_moments(self.func)
        starts = [sum(1 if r == Moment.NONE else 2 for r in reprs[:index]) for index in range(len(reprs))]
        mean, shape = fields[0], shape_of(fields[0])
        args = [mean] + ([fields[1]] if reprs[0] != Moment.NONE else [])
        extras = []
        for name in self.outputs:
            kernel = self.kernels.unique(f"logits_{name}")
            prim = build_predictive_kernel(name, shape, len(args) == 2, kernel, self.method, self.samples)
            gvar = self.bb.add_func(prim, kernel)
            out_shape = shape if name == "probs" else shape[:1]
            extras.append(self.bb.emit(relax.call_tir(gvar, relax.Tuple(args), relax.TensorType(out_shape, "float32")), name))
        for entry in ir_state.output_softmax(self.func):
            extras.append(self.output_function(entry, fields[starts[entry["output"]]:][: 1 if reprs[entry["output"]] == Moment.NONE else 2]))
        return relax.Tuple(fields + extras)

    def output_function(self, entry, moments):
        """The softmax / log-softmax of an output's Gaussian logits over its axis, by the method."""
        shape, axis = shape_of(moments[0]), int(entry["axis"])
        outer, inner = int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis + 1:], dtype=np.int64))
        view = [outer, shape[axis]] + ([inner] if inner > 1 else [])
        args = [self.bb.emit(relax.op.reshape(m, relax.ShapeExpr(view)), f"{m.name}_rows") for m in moments]
        function = "softmax" if self.sampled_network else entry["function"]  # mode svi averages probabilities
        kernel = self.kernels.unique(f"output{entry['output']}_{function}")
        prim = output_function_kernel(function, view, len(args) == 2, kernel, self.method, self.samples)
        gvar = self.bb.add_func(prim, kernel)
        values = self.bb.emit(relax.call_tir(gvar, relax.Tuple(args), relax.TensorType(view, "float32")), kernel)
        return self.bb.emit(relax.op.reshape(values, relax.ShapeExpr(shape)), f"{kernel}_values")


@tvm.transform.module_pass(opt_level=0, name="pfpc.AppendPredictiveOutputs")
class AppendPredictiveOutputs:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.EliminateZeroVariance", "pfpc.FuseOperators", "pfpc.ChooseMomentRepresentation", "pfpc.FoldWeightMoments")  # run before it when in the pipeline

    def __init__(self, outputs=DEFAULT_OUTPUTS, method=DEFAULT_METHOD, samples=DEFAULT_SAMPLES):
        self.outputs = check_outputs(outputs)
        self.method, self.samples = check_method(method, samples)

    def transform_module(self, mod, ctx):
        func = mod["main"]
        if not self.outputs and not ir_state.output_softmax(func):
            return mod
        count, shape = len(ir_state.output_moments(func)), shape_of(output_fields(func)[0])
        if self.outputs and (count != 1 or len(shape) != 2):
            raise PfpcError(f"--outputs {','.join(self.outputs)} needs a model with one [N, classes] output; it has {count} output(s), the first of shape {shape}")
        attrs = func_attrs(func, ir_state.encode(extra_outputs=self.outputs, predictive=(self.method, self.samples)))
        return _Append(mod, self.outputs, self.method, self.samples).run(list(func.params), attrs)
