"""The kernel graph both covariance passes read (`CarryChannelCovariance`, `ShareDenseScale`):
one walk of ``main`` per module, and the Cortex-M4 cost model their budgets are counted in.

`CovarianceGraph.of(mod)` lists the kernel calls in order with what each reads and who reads it,
and which convolutions' per-channel loadings can reach a mean over positions (through the ops
a loading goes through, `registry.LOADING_CARRIERS`) or a max-pool. It is computed once per
``main``: the second pass reuses the first's when the first left the module unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from tvm import relax

from ..ir import call_op_name, kernel_of, main_bindings, shape_of
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec
from ..ops.registry import LINEAR_OPS, LOADING_CARRIERS, LOADING_MAXIMA, LOADING_POOLS, LOADING_SLOPES, STAGES, Fusion


class Call(NamedTuple):
    """One kernel call of ``main``."""

    spec: KernelSpec
    sources: list  # the kernel-call vars whose outputs it reads (through views), in argument order
    binding: relax.Binding


def spatial_mean(spec, in_shape) -> bool:
    """Whether the kernel is a mean over all positions (ReduceMean, GlobalAveragePool, or an
    AveragePool whose one window is the whole input)."""
    op, attrs = spec.stages[0]
    if op == "avgpool2d":
        return list(attrs["kernel"]) == list(in_shape[2:]) and not any(attrs["pads"]) and len(in_shape) == 4
    return op == "reduce_mean" and len(in_shape) >= 3 and set(attrs["axes"]) >= set(range(2, len(in_shape)))


@dataclass(frozen=True)
class CovarianceGraph:
    order: list  # kernel-call vars in graph order
    calls: dict  # var -> `Call`
    users: dict  # var -> the kernel-call vars reading it
    to_mean: list  # convolutions whose loadings can reach a mean over positions, in order
    to_mean_or_maximum: list  # those and the convolutions whose loadings reach a max-pool (``channel``)
    passing: frozenset  # max-pools that pass their maxima's loadings on to a mean over positions

    @staticmethod
    def of(mod) -> CovarianceGraph:
        """The graph of ``mod["main"]`` (the last one computed, if it is the same function)."""
        func = mod["main"]
        if _last and _last[0].same_as(func):
            return _last[1]
        graph = _walk(mod)
        _last[:] = [func, graph]
        return graph

    def convolutions(self, maxima: bool = False) -> list:
        return self.to_mean_or_maximum if maxima else self.to_mean

    # --- the cost model ----------------------------------------------------------------------
    def diagonal_instructions(self, vars_=None) -> float:
        """Estimated Cortex-M4 instructions of the diagonal PFP's kernels (all, or ``vars_``)."""
        return sum(_diagonal_instructions(self.calls[var]) for var in (self.order if vars_ is None else vars_))

    def activation(self, var) -> tuple:
        """(the ReLU or Clip a convolution's output reaches through its bias add / batch norm / a
        residual add, or None; whether it reaches a residual add of two Gaussians; whether an
        unfolded batch norm scales it)."""
        residual = scaled = False
        for _ in range(4):
            following = self.users.get(var, [])
            if len(following) != 1:
                break
            var = following[0]
            spec = self.calls[var].spec
            stage = STAGES[spec.ops[0]]
            if spec.ops[0] in LOADING_SLOPES:
                return spec.ops[0], residual, scaled
            if stage.loading != "carry" or stage.fusion != Fusion.ELEMENTWISE:
                break
            residual = residual or (len(spec.operands) == 2 and Moment.NONE not in spec.operands)  # a residual add
            scaled = scaled or spec.ops[0] == "multiply"
        return None, residual, scaled

    def maximum_elements(self, var) -> tuple:
        """(output elements, var) of the max-pool a convolution's output reaches through its bias
        add / batch norm, which then reads its loading (`maxpool2d_correlated`); (0, None): none."""
        for _ in range(4):
            following = self.users.get(var, [])
            if len(following) != 1:
                return 0, None
            var = following[0]
            spec, _, binding = self.calls[var]
            if spec.ops[0] in LOADING_MAXIMA:
                return _sizes(spec, binding)[2], var
            stage = STAGES[spec.ops[0]]
            if stage.loading != "carry" or stage.fusion != Fusion.ELEMENTWISE:
                return 0, None
        return 0, None

    def extra_instructions(self, conv) -> tuple:
        """Estimated extra Cortex-M4 instructions of a convolution whose output gets a loading,
        (input without loading, input with loading): window sums, pooled variance, projection,
        the loading through the activation after it (`activation`), and for a loaded input the
        coherent term of a k x k window."""
        spec, _, binding = self.calls[conv]
        activation, residual, scaled = self.activation(conv)
        in_shape, weight, out = _sizes(spec, binding)
        in_ch, window = in_shape[1], int(np.prod(weight[2:]))
        length = out // weight[0]
        macs = out * int(np.prod(weight[1:]))
        per_mac = _PER_MAC["deterministic_padded" if any(spec.stages[0][1]["pads"]) else "deterministic"]
        gaussian_input = spec.operands[0] != Moment.NONE
        window_sum = in_ch * window * (length * per_mac + 40.0)  # a window sum reduces over the L output positions
        common = out * (_PER_ELEMENT["projection"] + (per_element(activation + "_loading") if activation else 0.0))
        common += in_shape[0] * int(np.prod(weight)) * _PER_MAC["pooled"]  # each row's window sums through the random weights
        common += out * _PER_ELEMENT["product"] if scaled else 0.0
        unloaded = common + window_sum * (2 if gaussian_input else 1)
        loaded = common + window_sum * 3 + int(np.prod(in_shape)) * _PER_ELEMENT["independent"]
        loaded += out * _PER_ELEMENT["residual"] if residual else 0.0
        if window > 1 and weight[1] == 1:  # depthwise: conv(a, mu)^2; conv2d_split's extra operand
            loaded += macs * (_PER_MAC["deterministic"] + _PER_MAC["split"]) + out * _PER_ELEMENT["product"]
        elif window > 1:  # box(a), squared, through (sum_t mu)^2
            loaded += in_ch * length * (window * per_mac + _PER_ELEMENT["product"])
            loaded += macs / window * _PER_MAC["deterministic"] + out * _PER_ELEMENT["product"]
        return unloaded, loaded

    def cost_curve(self, maxima: bool = False) -> list:
        """[(start, estimated extra instructions / the diagonal PFP's)]: loadings from the start-th
        of `convolutions` on (the first chosen convolution reads no loadings, the others do); a
        max-pool in ``passing`` also computes its maxima's loadings."""
        convs = self.convolutions(maxima)
        diagonal = self.diagonal_instructions()
        extra = [self.extra_instructions(var) for var in convs]
        maxima_cost = [elements * (per_element("maxpool2d_correlated") + (per_element("maxpool2d_loading") if pool in self.passing else 0.0))
                       for elements, pool in (self.maximum_elements(var) for var in convs)]
        extra = [(unloaded + more, loaded + more) for (unloaded, loaded), more in zip(extra, maxima_cost)]
        return [(start, sum(extra[index][index > start] for index in range(start, len(convs))) / diagonal)
                for start in range(len(convs))]


_last: list = []  # [main, its CovarianceGraph]: the one `CovarianceGraph.of` computed last


def _activation_sources(value, source) -> list:
    """The kernel-call vars whose outputs the kernel call ``value`` reads (through views)."""
    found = []
    for arg in value.args[1].fields:
        var = source.get(arg)
        if var is not None and var not in found:
            found.append(var)
    return found


def _walk(mod) -> CovarianceGraph:
    bindings = main_bindings(mod["main"])
    source, calls, order = {}, {}, []
    for binding in bindings:
        value = binding.value
        if isinstance(value, relax.TupleGetItem):
            source[binding.var] = source.get(value.tuple_value, value.tuple_value)
        elif call_op_name(value) == "relax.reshape":
            if value.args[0] in source:
                source[binding.var] = source[value.args[0]]
        else:
            found = kernel_of(mod, value)
            if found is not None:
                source[binding.var] = binding.var
                calls[binding.var] = Call(found[0], _activation_sources(value, source), binding)
                order.append(binding.var)
    users = {var: [] for var in order}
    for var in order:
        for src in calls[var].sources:
            users.setdefault(src, []).append(var)
    # reaches[maxima]: to a mean, or (maxima) also to a max-pool; to_mean: to a mean
    reaches, to_mean, passing = {False: set(), True: set()}, set(), set()
    for var in reversed(order):
        spec, _, binding = calls[var]
        if spec.ops[0] not in LOADING_CARRIERS or spec.output == Moment.NONE:
            continue
        mean = spatial_mean(spec, shape_of(binding.value.args[1].fields[0]))
        onward = spec.ops[0] not in LOADING_POOLS or spec.ops[0] in LOADING_MAXIMA  # a max-pool may pass it on
        if mean or (onward and any(user in to_mean for user in users.get(var, []))):
            to_mean.add(var)
            if spec.ops[0] in LOADING_MAXIMA:
                passing.add(var)  # a max-pool before a mean over positions: its maxima's loadings reach it
        for maxima, reached in reaches.items():
            if var in to_mean or (maxima and spec.ops[0] in LOADING_MAXIMA) or (
                    spec.ops[0] not in LOADING_POOLS and any(user in reached for user in users.get(var, []))):
                reached.add(var)
    convs = {maxima: [var for var in order if calls[var].spec.ops[0] == "conv2d" and var in reached] for maxima, reached in reaches.items()}
    return CovarianceGraph(order, calls, users, convs[False], convs[True], frozenset(passing))


# Cortex-M4 instructions (QEMU counts of the compiled kernels, benchmarks/covariance_compiled.py)
# per multiply-add of a Gaussian / deterministic-input convolution and of a deterministic one,
# and per element of the element-wise kernels: the budget of ``auto`` is counted in these.
# A deterministic convolution with zero padding tests every tap's bounds: twice the cost.
_PER_MAC = {"gaussian": 8.0, "input": 5.6, "deterministic": 3.5, "deterministic_padded": 7.0, "pooled": 12.0, "split": 3.0}
_PER_OUTPUT = 25.0  # a Gaussian convolution's per-output work besides its multiply-adds
_PER_ELEMENT = {"projection": 25.0, "residual": 50.0, "independent": 12.0, "product": 8.0, "other": 8.0}


def per_element(stage) -> float:
    """Cortex-M4 instructions per output element of an element-wise stage (the registry's, or generic)."""
    cost = STAGES[stage].m4_per_element if stage in STAGES else None
    return _PER_ELEMENT["other"] if cost is None else cost


def _sizes(spec, binding):
    """(input shape, weight shape or None, output elements) of a kernel call."""
    fields = binding.value.args[1].fields
    out_ty = binding.var.ty.fields[0] if hasattr(binding.var.ty, "fields") else binding.var.ty
    out = int(np.prod([int(d) for d in out_ty.shape]))
    weight = None
    if spec.ops[0] in LINEAR_OPS and len(spec.operands) == 2:
        weight = shape_of(fields[2 if spec.operands[0] != Moment.NONE else 1])
    return shape_of(fields[0]), weight, out


def _diagonal_instructions(call: Call) -> float:
    """Estimated Cortex-M4 instructions of one kernel of the diagonal PFP."""
    in_shape, weight, out = _sizes(call.spec, call.binding)
    if weight is not None:
        per_output = int(np.prod(weight[1:])) if call.spec.ops[0] == "conv2d" else weight[-2]
        return out * (_PER_OUTPUT + per_output * _PER_MAC["gaussian" if call.spec.operands[0] != Moment.NONE else "input"])
    return out * per_element(call.spec.ops[0])
