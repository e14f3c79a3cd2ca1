"""Carry each channel's shared weight noise as a loading beside the diagonal moments (``--covariance``).

In a convolution every output position of a channel is computed with the same random weights,
so the positions of a channel are correlated; a global average pool summing them needs that
covariance, which the diagonal PFP drops. Each activation is modelled as
x[c, p] = m + a z_c + e (docs/covariance.md): the loading a is a deterministic tensor beside
(m, v), made by the convolutions the plan names and carried through the activations, Pad, residual
Add, a deterministic scale (an unfolded batch norm) and views to the global pool, which adds it coherently. An op without a rule drops the
loading (exactly the diagonal PFP from there on). For a convolution reading a loaded input:

    y = conv2d(x, w)              ->   e        = independent_variance(x, a)          v - a^2
                                       y        = conv2d_split(x, w, e)               conv(m^2+v, s2) + conv(e, mu^2)
                                       coherent = conv1x1(box(a)^2, (sum_t mu)^2)     (depthwise: conv(a, mu)^2)
                                       y        = add_variance(y, coherent)           (fused into the conv)
and, for a convolution the plan names (its output gets a loading):
                                       shared   = coherent + conv1x1(box(m^2 + v), sum_t s2) + s2_b
                                       M, A, E  = window sums of m, a, e (depthwise convs with ones)
                                       pooled   = sum_c (sum_t mu A)^2 + conv(M^2 + A^2 + E, s2) + L^2 s2_b
                                       a_out    = projection_gain(pooled, sum sqrt(shared), sum shared) * sqrt(shared)
    relu(x)                       ->   relu(x); a_out = relu_loading(x, a)     a Phi(m / s) = a E[f'(x)]
    f(x), another activation      ->   f(x); a_out = a E[f'(x)] (`registry.LOADING_SLOPES`: Clip,
                                       LeakyRelu, PRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, SiLU, GELU,
                                       Softplus, Elu, Selu)
    a1 + a2 (both loaded)         ->   the sum; a_out = projection of a1^2 + a2^2 with pooled (sum a1)^2 + (sum a2)^2
    mean over positions           ->   pooled_variance: avg m, avg(v - a^2) / P + avg(a)^2
    max-pool (``channel``, or a    ->   maxpool2d_correlated(x, a): Clark's max of the window's
    mean over positions after it)      elements with covariance a1 a2; where a mean over positions
                                       follows, a_out = maxpool2d_loading(x, a): the maxima's
                                       loadings a1 Phi(al) + a2 Phi(-al) step by step (Stein)

box(.) is the window's mean (a depthwise convolution with 1/T): the coherent term of a k x k
convolution over several input channels, sum_c (sum_t mu a)^2, would be a nested reduction;
its box form ("channel_box" in the measurements) is one. The shared part's weight noise is also
taken in box form: it only shapes how the loading spreads over positions (the pooled variance
is exact, the variance is exact). ``mode="pooled"``: the variances stay the diagonal PFP's
(no split, no coherent term), the loadings feed only the pooled variances.

The plan: the convolutions whose loadings can reach a mean over positions through those ops
(``channel``: or a max-pool, e.g. LeNet-5's; ``auto`` leaves those on the diagonal PFP: on the
seed LeNet-5 they recover a few percent of the logits' variance, docs/covariance.md);
``auto`` starts them at the earliest such convolution for which the estimated extra Cortex-M4
instructions of the compiled form (`_extra_instructions`, per-kernel costs calibrated against
QEMU counts) stay within ``budget`` of the diagonal PFP's estimated instructions
(no convolution reaches a pool: the module is returned unchanged). Runs after
`EliminateZeroVariance` (deterministic weights known) and before `FuseOperators`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import ir_state
from ..errors import PfpcError
from ..ir import GaussianValue, call_op_name, kernel_of, main_bindings, output_shape, shape_of, with_attrs
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec, infer_output_repr
from ..ops.registry import LINEAR_OPS, LOADING_CARRIERS, LOADING_MAXIMA, LOADING_POOLS, LOADING_SLOPES, STAGES, Fusion
from .kernel_rewriter import KernelRewriter

COVARIANCE_MODES = ("auto", "none", "channel", "pooled")
DEFAULT_BUDGET = 0.5


def _spatial_mean(spec, in_shape) -> bool:
    """Whether the kernel is a mean over all positions (ReduceMean, GlobalAveragePool, or an
    AveragePool whose one window is the whole input)."""
    op, attrs = spec.stages[0]
    if op == "avgpool2d":
        return list(attrs["kernel"]) == list(in_shape[2:]) and not any(attrs["pads"]) and len(in_shape) == 4
    return op == "reduce_mean" and len(in_shape) >= 3 and set(attrs["axes"]) >= set(range(2, len(in_shape)))


def _activation_sources(mod, value, item_of, source) -> list:
    """The kernel-call vars whose outputs the kernel call ``value`` reads (through views)."""
    found = []
    for arg in value.args[1].fields:
        var = source.get(arg)
        if var is not None and var not in found:
            found.append(var)
    return found


def _graph(mod, maxima: bool = False):
    """(kernel-call vars in order, var -> (spec, source vars, binding), var -> user vars, the
    convolutions whose loadings can reach a mean over positions, or with ``maxima`` also a
    max-pool, the max-pools that pass a loading on to a mean over positions)."""
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
                calls[binding.var] = (found[0], _activation_sources(mod, value, None, source), binding)
                order.append(binding.var)
    users = {var: [] for var in order}
    for var in order:
        for src in calls[var][1]:
            users.setdefault(src, []).append(var)
    reaches, to_mean, passing = set(), set(), set()  # to a mean or (maxima) a max-pool; to a mean
    for var in reversed(order):
        spec, _, binding = calls[var]
        if spec.ops[0] not in LOADING_CARRIERS or spec.output == Moment.NONE:
            continue
        mean = _spatial_mean(spec, shape_of(binding.value.args[1].fields[0]))
        onward = spec.ops[0] not in LOADING_POOLS or spec.ops[0] in LOADING_MAXIMA  # a max-pool may pass it on
        if mean or (onward and any(user in to_mean for user in users.get(var, []))):
            to_mean.add(var)
            if spec.ops[0] in LOADING_MAXIMA:
                passing.add(var)  # a max-pool before a mean over positions: its maxima's loadings reach it
        if var in to_mean or (maxima and spec.ops[0] in LOADING_MAXIMA) or (
                spec.ops[0] not in LOADING_POOLS and any(user in reaches for user in users.get(var, []))):
            reaches.add(var)
    convs = [var for var in order if calls[var][0].ops[0] == "conv2d" and var in reaches]
    return order, calls, users, convs, passing


def plan(mod, mode: str, budget: float) -> list:
    """The conv kernel-call vars (of ``main``) whose outputs get loadings, in graph order."""
    if mode == "none":
        return []
    order, calls, users, convs, passing = _graph(mod, maxima=mode == "channel")
    if mode == "channel" or mode == "pooled" or not convs:
        return convs
    for start, fraction in _cost_curve(order, calls, users, convs, passing):
        if fraction <= budget:
            return convs[start:]
    return []


def _cost_curve(order, calls, users, convs, passing=frozenset()) -> list:
    """[(start, estimated extra instructions / the diagonal PFP's)]: loadings from the start-th
    of ``convs`` on (the first chosen convolution reads no loadings, the others do); a max-pool
    in ``passing`` also computes its maxima's loadings."""
    diagonal = sum(_diagonal_instructions(*calls[var]) for var in order)
    extra = [_extra_instructions(calls[var], _activation(var, calls, users)) for var in convs]
    maxima = [elements * (_per_element("maxpool2d_correlated") + (_per_element("maxpool2d_loading") if pool in passing else 0.0))
              for elements, pool in (_maximum_elements(var, calls, users) for var in convs)]
    extra = [(unloaded + more, loaded + more) for (unloaded, loaded), more in zip(extra, maxima)]
    return [(start, sum(extra[index][index > start] for index in range(start, len(convs))) / diagonal)
            for start in range(len(convs))]


def cost_curve(mod, maxima: bool = False) -> list:
    """The trade-off ``auto`` chooses on: [(number of convolutions with loadings, estimated extra
    Cortex-M4 instructions as a fraction of the diagonal PFP's)], from all of them to the last
    (``maxima``: with the convolutions that reach only a max-pool, as ``channel`` plans them)."""
    order, calls, users, convs, passing = _graph(mod, maxima)
    return [(len(convs) - start, fraction) for start, fraction in _cost_curve(order, calls, users, convs, passing)]


# Cortex-M4 instructions (QEMU counts of the compiled kernels, benchmarks/covariance_compiled.py)
# per multiply-add of a Gaussian / deterministic-input convolution and of a deterministic one,
# and per element of the element-wise kernels: the budget of ``auto`` is counted in these.
# A deterministic convolution with zero padding tests every tap's bounds: twice the cost.
_PER_MAC = {"gaussian": 8.0, "input": 5.6, "deterministic": 3.5, "deterministic_padded": 7.0, "pooled": 12.0, "split": 3.0}
_PER_OUTPUT = 25.0  # a Gaussian convolution's per-output work besides its multiply-adds
_PER_ELEMENT = {"projection": 25.0, "residual": 50.0, "independent": 12.0, "product": 8.0, "other": 8.0}


def _per_element(stage) -> float:
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


def _diagonal_instructions(spec, _sources, binding) -> float:
    """Estimated Cortex-M4 instructions of one kernel of the diagonal PFP."""
    in_shape, weight, out = _sizes(spec, binding)
    if weight is not None:
        per_output = int(np.prod(weight[1:])) if spec.ops[0] == "conv2d" else weight[-2]
        return out * (_PER_OUTPUT + per_output * _PER_MAC["gaussian" if spec.operands[0] != Moment.NONE else "input"])
    return out * _per_element(spec.ops[0])


def _activation(var, calls, users) -> tuple:
    """(the ReLU or Clip a convolution's output reaches through its bias add / batch norm / a
    residual add, or None; whether it reaches a residual add of two Gaussians; whether an
    unfolded batch norm scales it)."""
    residual = scaled = False
    for _ in range(4):
        following = users.get(var, [])
        if len(following) != 1:
            break
        var = following[0]
        spec = calls[var][0]
        stage = STAGES[spec.ops[0]]
        if spec.ops[0] in LOADING_SLOPES:
            return spec.ops[0], residual, scaled
        if stage.loading != "carry" or stage.fusion != Fusion.ELEMENTWISE:
            break
        residual = residual or (len(spec.operands) == 2 and Moment.NONE not in spec.operands)  # a residual add
        scaled = scaled or spec.ops[0] == "multiply"
    return None, residual, scaled


def _maximum_elements(var, calls, users) -> tuple:
    """(output elements, var) of the max-pool a convolution's output reaches through its bias
    add / batch norm, which then reads its loading (`maxpool2d_correlated`); (0, None): none."""
    for _ in range(4):
        following = users.get(var, [])
        if len(following) != 1:
            return 0, None
        var = following[0]
        spec, _, binding = calls[var]
        if spec.ops[0] in LOADING_MAXIMA:
            return _sizes(spec, binding)[2], var
        stage = STAGES[spec.ops[0]]
        if stage.loading != "carry" or stage.fusion != Fusion.ELEMENTWISE:
            return 0, None
    return 0, None


def _extra_instructions(call, following) -> tuple:
    """Estimated extra Cortex-M4 instructions of a convolution the plan names, (input without
    loading, input with loading): window sums, pooled variance, projection, the loading through
    the activation after it (``following``: `_activation`), and for a loaded input the coherent
    term of a k x k window."""
    spec, _, binding = call
    activation, residual, scaled = following
    in_shape, weight, out = _sizes(spec, binding)
    in_ch, window = in_shape[1], int(np.prod(weight[2:]))
    length = out // weight[0]
    macs = out * int(np.prod(weight[1:]))
    per_mac = _PER_MAC["deterministic_padded" if any(spec.stages[0][1]["pads"]) else "deterministic"]
    gaussian_input = spec.operands[0] != Moment.NONE
    window_sum = in_ch * window * (length * per_mac + 40.0)  # a window sum reduces over the L output positions
    common = out * (_PER_ELEMENT["projection"] + (_per_element(activation + "_loading") if activation else 0.0))
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


class _Rewriter(KernelRewriter):
    def __init__(self, mod, planned, pooled_only, maxima, passing=(), separable=False):
        super().__init__(mod)
        self.separable = separable  # window sums along rows, then columns (`window_sums`)
        self.maxima = maxima  # max-pools read their inputs' loadings (``channel``)
        self.passing = set(passing)  # max-pools that read them and pass their maxima's loadings on
        self.planned = set(planned)
        self.pooled_only = pooled_only
        self.loading = {}  # new mean var -> loading GaussianValue (deterministic), or a `_Pending` one
        self.ones = {}  # shape -> the window sums' weight of ones

    # --- emitting -----------------------------------------------------------------------------
    def emit(self, stage, attrs, operands, output=None, nodes=()):
        """A one-stage kernel; ``nodes``: the ONNX nodes it computes (the node of the kernel it
        replaces, which names it in the C), none for the loadings' own work."""
        spec = KernelSpec(((stage, attrs),), tuple(o.repr for o in operands), Moment.NONE, nodes=(tuple(nodes),) if nodes else ())
        spec = spec.with_(output=output if output is not None else infer_output_repr(spec))
        names = [f"x{i}" for i in range(len(operands))]
        self.used.update(arg for operand in operands for arg in operand.args())
        return self.kernels.emit(spec, operands, f"cov_{stage}", names)

    def weight(self, name, value):
        return GaussianValue(self.add_weight(name, np.asarray(value, np.float32)))

    def det(self, value: GaussianValue):
        return GaussianValue(value.mean)

    def view(self, value: GaussianValue, shape):
        return GaussianValue(self.bb.emit(relax.op.reshape(value.mean, relax.ShapeExpr([int(d) for d in shape]))))

    def conv(self, x, weight, strides, pads, dilations, groups):
        attrs = {"strides": [int(s) for s in strides], "pads": [int(p) for p in pads], "dilations": [int(d) for d in dilations],
                 "groups": int(groups)}
        return self.emit("conv2d", attrs, [x, weight])

    def project(self, diagonal, pooled):
        """a = k sqrt(d), k from the pooled variance (`channel_covariance.projection_gain`); d is
        ``diagonal``'s value, or its variance when it is a Gaussian."""
        axes = {"axes": list(range(2, len(shape_of(diagonal.mean)))), "keepdims": True}
        root = self.emit("root", {}, [diagonal])
        root_sum = self.emit("reduce_sum", axes, [root])
        diagonal_sum = self.emit("reduce_sum", axes, [diagonal])
        gain = self.emit("projection_gain", {}, [pooled, root_sum, diagonal_sum])
        return self.emit("multiply", {}, [root, gain])

    def _passes_on(self, binding, pending) -> bool:
        """Whether the kernel call ``binding`` leaves a `_Pending` loading's spread as it is: the
        bias add it counted, or an add of a deterministic tensor (a batch norm's shift)."""
        if pending.bias_add is not None and binding.var.same_as(pending.bias_add):
            return True
        found = kernel_of(self.mod, binding.value)
        return found is not None and found[0].ops == ["add"] and Moment.NONE in found[0].operands

    def loaded(self, operand, binding):
        """The loading of ``operand`` (None: it has none); a `_Pending` one is projected here,
        unless ``binding`` passes it on (`_passes_on`)."""
        load = self.loading.get(operand.mean)
        if isinstance(load, _Pending) and not self._passes_on(binding, load):
            if operand.repr != Moment.VAR:
                return None
            load = self.loading[operand.mean] = self.project(operand, load.pooled)
        return load

    # --- the walk -----------------------------------------------------------------------------
    def _visit(self, binding):
        value = binding.value
        found = kernel_of(self.mod, value)
        if found is None:
            super()._visit(binding)
            if call_op_name(value) == "relax.reshape" and binding.var in self.values and value.args[0] in self.values:
                gauss, component = self.values[binding.var]
                source = self.values[value.args[0]][0]
                if component == "mean" and source.mean in self.loading and gauss.mean not in self.loading:
                    load = self.loaded(source, binding)
                    if load is not None:
                        self.loading[gauss.mean] = self.view(load, shape_of(gauss.mean))
            return
        spec, _ = found
        op, attrs = spec.stages[0]
        if len(spec.stages) != 1:
            super()._visit(binding)
            return
        operands = self._operands(spec, list(value.args[1].fields))
        loads = [self.loaded(o, binding) for o in operands]
        if op == "conv2d" and (loads[0] is not None or binding.var in self.planned):
            result = self.convolution(binding, spec, attrs, operands, loads[0])
        elif loads[0] is not None and _spatial_mean(spec, shape_of(operands[0].mean)) and operands[0].repr == Moment.VAR:
            x, a = operands[0], loads[0]
            e = self.emit("independent_variance", {}, [x, a])
            attrs = attrs if op == "reduce_mean" else {"axes": list(range(2, len(shape_of(x.mean)))), "keepdims": True}
            pooled = self.emit("reduce_mean", attrs, [x])
            count = int(np.prod(shape_of(x.mean)[2:]))
            result = self.emit("pooled_variance", {"count": count},
                               [pooled, self.emit("reduce_mean", attrs, [e]), self.emit("reduce_mean", attrs, [a])], nodes=spec.stage_nodes(0))
        elif (self.maxima or binding.var in self.passing) and loads[0] is not None and op in LOADING_MAXIMA and operands[0].repr == Moment.VAR:
            result = self.emit("maxpool2d_correlated", attrs, [operands[0], loads[0]], nodes=spec.stage_nodes(0))
            if binding.var in self.passing:
                self.loading[result.mean] = self.emit("maxpool2d_loading", attrs, [operands[0], loads[0]])
        else:
            # an activation's loading first: the activation is then the last to read its input,
            # which it may overwrite (`kernel.in_place_operands`)
            activation = self.activation_loading(op, attrs, operands, loads)
            super()._visit(binding)
            result = self.values[binding.var][0]
            if activation is not None and result.repr != Moment.NONE:
                self.loading[result.mean] = activation
            elif activation is None:
                self.carry(op, attrs, operands, loads, result)
            return
        self.values[binding.var] = (result, "mean")
        self.results[binding.var] = result

    def activation_loading(self, op, attrs, operands, loads):
        """The output loading of an activation of a loaded Gaussian (a E[f'(x)], its stage in
        `LOADING_SLOPES`), else None."""
        if loads[0] is None or operands[0].repr == Moment.NONE or op not in LOADING_SLOPES:
            return None
        return self.emit(LOADING_SLOPES[op], attrs, [operands[0], loads[0], *operands[1:]])  # PRelu: its slope

    def carry(self, op, attrs, operands, loads, result):
        """The output loading of another op the loadings pass through."""
        if result.repr == Moment.NONE:
            return
        if op == "multiply" and loads[0] is not None and operands[1].repr == Moment.NONE and shape_of(operands[0].mean) == shape_of(result.mean):
            self.loading[result.mean] = self.emit("multiply", {}, [loads[0], operands[1]])  # an unfolded batch norm's scale
        elif op == "scale" and loads[0] is not None:
            self.loading[result.mean] = self.emit("scale", attrs, [loads[0]])
        elif op == "pad" and loads[0] is not None:
            # copies (edge/reflect) copy their loading; a constant border has none, whatever its value
            self.loading[result.mean] = self.emit("pad", {**attrs, "value": 0.0} if "value" in attrs else attrs, [loads[0]])
        elif op == "add":
            present = [(load, operand) for load, operand in zip(loads, operands) if load is not None]
            same = all(shape_of(operand.mean) == shape_of(result.mean) for _, operand in present)
            if len(present) == 1 and same:
                self.loading[result.mean] = present[0][0]
            elif len(present) == 2 and same:
                a1, a2 = loads
                axes = {"axes": list(range(2, len(shape_of(a1.mean)))), "keepdims": True}
                diagonal = self.emit("square_add", {}, [a1, self.emit("multiply", {}, [a2, a2])])
                sum1, sum2 = self.emit("reduce_sum", axes, [a1]), self.emit("reduce_sum", axes, [a2])
                pooled = self.emit("square_add", {}, [sum1, self.emit("multiply", {}, [sum2, sum2])])
                self.loading[result.mean] = self.project(diagonal, pooled)

    def convolution(self, binding, spec, attrs, operands, a):
        x, w = operands
        strides, pads, dilations, groups = attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"]
        mu = self.weights[w.mean.name].astype(np.float64)
        s2 = self.weights[w.moment.name].astype(np.float64) if w.repr == Moment.VAR else np.zeros_like(mu)
        out_ch, group_ch, kernel_h, kernel_w = mu.shape
        window = kernel_h * kernel_w
        in_ch = group_ch * groups
        stem = w.mean.name
        independent = load_sums = None
        planned = binding.var in self.planned and x.repr != Moment.SECOND_MOMENT
        if a is not None and not self.pooled_only and window > 1:
            # a 1x1 window needs nothing: sum_c mu^2 a^2 + conv(v - a^2, mu^2) is the diagonal conv(v, mu^2)
            if group_ch == 1:  # depthwise: the exact coherent term, (sum_t mu a)^2
                through = self.conv(a, self.det(w), strides, pads, dilations, groups)
                coherent = self.emit("multiply", {}, [through, through])
            else:  # sum_c (sum_t mu)^2 box(a)^2
                mu_sum2 = self.weight(f"{stem}.coherent", mu.sum(axis=(2, 3), keepdims=True) ** 2)
                box = np.full([in_ch, 1, kernel_h, kernel_w], 1.0 / window)
                averaged = self.conv(a, self.weight(f"{stem}.box", box), strides, pads, dilations, in_ch)
                squared = self.emit("multiply", {}, [averaged, averaged])
                coherent = self.conv(squared, mu_sum2, [1, 1], [0, 0, 0, 0], [1, 1], groups)
            if planned:  # the loading's window sums before v - a^2, its last reader, which may then overwrite it
                load_sums = self.window_sums(x, mu.shape, attrs, output_shape(binding.var))(a)
            independent = self.emit("independent_variance", {}, [x, a])
            y = self.emit("conv2d_split", attrs, [x, w, independent], nodes=spec.stage_nodes(0))
            y = self.emit("add_variance", {"square": False}, [y, coherent])
        else:
            y = self.emit("conv2d", attrs, [x, w], nodes=spec.stage_nodes(0))
        if not planned:
            return y
        self.loading[y.mean] = self.output_loading(binding, x, a, independent, w, mu, s2, attrs, shape_of(y.mean), load_sums)
        return y

    def _bias_add(self, binding, out_ch):
        """(the bias add right after the convolution (its one consumer), its s2_b), else (None, zeros)."""
        users = self.consumers.get(binding.var, [])
        if len(users) == 1 and users[0] != "output":
            found = kernel_of(self.mod, users[0].value)
            if found is not None and found[0].ops == ["add"] and found[0].operands[1] == Moment.VAR:
                fields = users[0].value.args[1].fields
                first = 1 if found[0].operands[0] == Moment.NONE else 2
                name = fields[first + 1].name if isinstance(fields[first + 1], relax.Var) else None
                if name in self.weights and self.weights[name].size == out_ch:
                    return users[0].var, self.weights[name].astype(np.float64).reshape(-1)
        return None, np.zeros(out_ch)

    @staticmethod
    def _window_extent(x, kernel_shape, attrs, out_shape):
        """(padding of the window sums, extra taps per axis): the window sums over the output grid
        are a depthwise convolution of ones (out_h x out_w taps, dilated by the strides, stepping by
        the dilations), its far padding cut so that it has kernel_h x kernel_w outputs (input rows the
        convolution never reads give ``extra`` outputs, which zero weight taps ignore)."""
        strides, pads, dilations = attrs["strides"], attrs["pads"], attrs["dilations"]
        _, _, height, width = shape_of(x.mean)
        _, _, kernel_h, kernel_w = kernel_shape
        out_h, out_w = out_shape[2:]
        far, extra = [], []
        for axis, (size, kernel, out, low, high) in enumerate(((height, kernel_h, out_h, pads[0], pads[2]), (width, kernel_w, out_w, pads[1], pads[3]))):
            spare = size + low + high - strides[axis] * (out - 1) - 1 - dilations[axis] * (kernel - 1)
            far.append(max(high - spare, 0))
            extra.append(max(spare - high, 0) // dilations[axis])
        return [pads[0], pads[1], far[0], far[1]], extra

    def ones_weight(self, shape):
        """A depthwise convolution's weight of ones ([channels, 1, height, width]), one per shape."""
        key = tuple(int(d) for d in shape)
        if key not in self.ones:
            self.ones[key] = self.weight(f"window_ones_{'x'.join(str(d) for d in key[:1] + key[2:])}", np.ones(key))
        return self.ones[key]

    def window_sums(self, x, kernel_shape, attrs, out_shape):
        """value -> its window sums over the output grid of the convolution of ``x`` (`_window_extent`).
        ``separable``: along the rows first (out_w taps per row), then along the columns of those
        sums (out_h taps): out_w per input row and out_h per output instead of out_h out_w per
        output (ResNet-8 on Cortex-M4: the window sums 9.29 M -> 3.07 M instructions)."""
        in_ch = shape_of(x.mean)[1]
        pads, _ = self._window_extent(x, kernel_shape, attrs, out_shape)
        out_h, out_w = out_shape[2:]
        strides, dilations = attrs["strides"], attrs["dilations"]
        if not self.separable:
            ones = self.ones_weight([in_ch, 1, out_h, out_w])
            return lambda value: self.conv(value, ones, dilations, pads, strides, in_ch)
        (top, left, bottom, right), (stride_h, stride_w), (dilation_h, dilation_w) = pads, strides, dilations
        rows, columns = self.ones_weight([in_ch, 1, 1, out_w]), self.ones_weight([in_ch, 1, out_h, 1])

        def sums(value):
            along_rows = self.conv(value, rows, [1, dilation_w], [0, left, 0, right], [1, stride_w], in_ch)
            return self.conv(along_rows, columns, [dilation_h, 1], [top, 0, bottom, 0], [stride_h, 1], in_ch)
        return sums

    def output_loading(self, binding, x, a, independent, w, mu, s2, attrs, out_shape, load_sums=None):
        """The pooled variance T of the convolution's output (with the bias added right after it),
        as a `_Pending` loading: the projection spreads it once the bias is added. ``load_sums``: the
        loading's window sums, when already made."""
        strides, pads, dilations, groups = attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"]
        out_ch, group_ch, kernel_h, kernel_w = mu.shape
        batch, in_ch, height, width = shape_of(x.mean)
        out_h, out_w = out_shape[2:]
        length = out_h * out_w
        _, extra = self._window_extent(x, mu.shape, attrs, out_shape)
        window_sums = self.window_sums(x, mu.shape, attrs, out_shape)  # of the unpadded window
        stem = binding.var.name
        if any(extra) or w.repr != Moment.VAR:  # the weights padded to the window sums' taps (else the convolution's own)
            widths = [(0, 0), (0, 0), (0, extra[0]), (0, extra[1])]
            mu, s2 = np.pad(mu, widths), np.pad(s2, widths)
            w = GaussianValue(self.add_weight(f"{stem}.mu", mu.astype(np.float32)), self.add_weight(f"{stem}.s2", s2.astype(np.float32)),
                              Moment.VAR)
        kernel_h, kernel_w = kernel_h + extra[0], kernel_w + extra[1]

        def pooled_conv(value):
            return self.conv(value, w, [1, 1], [0, 0, 0, 0], [1, 1], groups)

        # T = Var(sum_p y_p) = sum_{c,t} s2 (M^2 + A^2 + E) + mu^2 E + sum_c (sum_t mu A)^2 + L^2 s2_b with the
        # window sums M = sum_p m, E = sum_p (v - a^2), A = sum_p a: the variance of the
        # convolution of the Gaussian (M, E) with the random weights is the first two terms but
        # s2 A^2; for a 1x1 window sum_c (sum_t mu A)^2 = sum_c mu^2 A^2, so (M, E + A^2) gives all
        if load_sums is None and a is not None:
            load_sums = window_sums(a)
        if x.repr == Moment.NONE:  # a model input
            pooled = pooled_conv(window_sums(x))
        else:
            if independent is None:
                independent = self.emit("independent_variance", {}, [x, a]) if a is not None else GaussianValue(x.moment)
            means, indeps = window_sums(self.det(x)), window_sums(independent)
            if a is not None and kernel_h * kernel_w == 1:
                indeps, load_sums = self.emit("square_add", {}, [load_sums, indeps]), None
            pooled = pooled_conv(GaussianValue(means.mean, indeps.mean, Moment.VAR))
        latent = None
        if load_sums is not None:
            latent = self.conv(self.emit("multiply", {}, [load_sums, load_sums]), GaussianValue(w.moment), [1, 1], [0, 0, 0, 0], [1, 1], groups)
            if group_ch == 1:  # depthwise: (sum_t mu A)^2
                h = self.conv(load_sums, self.det(w), [1, 1], [0, 0, 0, 0], [1, 1], groups)
                total = self.emit("multiply", {}, [h, h])
            else:  # sum_c (sum_t mu[o,c,t] A[c,t])^2: per input channel, its outputs' weights
                per_group = out_ch // groups
                spread = mu.reshape(groups, per_group, group_ch, kernel_h, kernel_w).transpose(0, 2, 1, 3, 4)
                spread = spread.reshape(in_ch * per_group, 1, kernel_h, kernel_w)
                h = self.conv(load_sums, self.weight(f"{stem}.spread", spread), [1, 1], [0, 0, 0, 0], [1, 1], in_ch)
                h2 = self.view(self.emit("multiply", {}, [h, h]), [batch, groups, group_ch, per_group])
                total = self.view(self.emit("reduce_sum", {"axes": [2], "keepdims": False}, [h2]), [batch, out_ch, 1, 1])
            latent = self.emit("add", {}, [latent, total])
        bias_add, bias_var = self._bias_add(binding, out_ch)
        if np.any(bias_var):
            bias = self.weight(f"{stem}.pooled_bias", (length**2 * bias_var).reshape(1, out_ch, 1, 1))
            latent = bias if latent is None else self.emit("add", {}, [latent, bias])
        if latent is not None:
            pooled = self.emit("add_variance", {"square": False}, [pooled, latent])
        return _Pending(pooled, bias_add)


class _Pending:
    """A convolution's output loading before its projection: the pooled variance T, spread over
    positions by the variance of the tensor it is first read from, which is after the bias add ``bias_add`` (so that the convolution keeps the bias add
    fused and the spread includes s2_b, as T does)."""

    __slots__ = ("pooled", "bias_add")

    def __init__(self, pooled, bias_add):
        self.pooled, self.bias_add = pooled, bias_add


@tvm.transform.module_pass(opt_level=0, name="pfpc.CarryChannelCovariance")
class CarryChannelCovariance:
    requires = ("pfpc.SubstituteLayers",)  # must have run before it
    after = ("pfpc.EliminateZeroVariance",)  # run before it when in the pipeline

    def __init__(self, mode: str = "auto", budget: float = DEFAULT_BUDGET, separable_sums: bool = False):
        """``separable_sums``: window sums along rows, then columns (`_Rewriter.window_sums`; fewer
        additions, one more kernel and its small buffer: `pipeline.for_target` asks for it on cores
        without SIMD)."""
        if mode not in COVARIANCE_MODES:
            raise PfpcError(f"--covariance {mode!r}: one of {', '.join(COVARIANCE_MODES)}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise PfpcError(f"--covariance-budget {budget!r}: a non-negative fraction of the diagonal PFP's work (0.5 = 50 %)")
        self.mode, self.budget, self.separable_sums = mode, float(budget), separable_sums
        self.planned_convs = 0

    def transform_module(self, mod, ctx):
        planned = plan(mod, self.mode, self.budget)
        self.planned_convs = len(planned)
        if not planned:
            return mod  # nothing reaches a pool: the diagonal PFP, unchanged
        passing = _graph(mod, maxima=self.mode == "channel")[4]
        mod = _Rewriter(mod, planned, self.mode == "pooled", self.mode == "channel", passing, self.separable_sums).run()
        record = {"option": self.mode, "mode": "pooled" if self.mode == "pooled" else "channel", "budget": self.budget,
                  "convolutions": [var.name for var in planned]}
        mod["main"] = with_attrs(mod["main"], ir_state.encode(covariance=record))
        return mod
