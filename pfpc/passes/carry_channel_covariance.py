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
instructions of the compiled form (`CovarianceGraph.extra_instructions`, per-kernel costs calibrated
against QEMU counts) stay within ``budget`` of the diagonal PFP's estimated instructions
(no convolution reaches a pool: the module is returned unchanged). Runs after
`EliminateZeroVariance` (deterministic weights known) and before `FuseOperators`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import ir_state
from ..errors import PfpcError
from ..ir import GaussianValue, call_op_name, kernel_of, output_shape, shape_of, with_attrs
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec, infer_output_repr
from ..ops.registry import LOADING_MAXIMA, LOADING_SLOPES
from .covariance_graph import CovarianceGraph, spatial_mean
from .kernel_rewriter import KernelRewriter

COVARIANCE_MODES = ("auto", "none", "channel", "pooled")
DEFAULT_BUDGET = 0.5


def plan(mod, mode: str, budget: float, graph: CovarianceGraph | None = None) -> list:
    """The conv kernel-call vars (of ``main``) whose outputs get loadings, in graph order."""
    if mode == "none":
        return []
    graph = graph or CovarianceGraph.of(mod)
    convs = graph.convolutions(maxima=mode == "channel")
    if mode == "channel" or mode == "pooled" or not convs:
        return convs
    for start, fraction in graph.cost_curve():
        if fraction <= budget:
            return convs[start:]
    return []


def cost_curve(mod, maxima: bool = False) -> list:
    """The trade-off ``auto`` chooses on: [(number of convolutions with loadings, estimated extra
    Cortex-M4 instructions as a fraction of the diagonal PFP's)], from all of them to the last
    (``maxima``: with the convolutions that reach only a max-pool, as ``channel`` plans them)."""
    graph = CovarianceGraph.of(mod)
    count = len(graph.convolutions(maxima))
    return [(count - start, fraction) for start, fraction in graph.cost_curve(maxima)]


#: Taps along a row under which ``separable_sums="narrow"`` sums a window separably: two vectors of
#: 4 floats (`codegen.schedule.VECTOR_LANES`), the shortest row `schedule._partial_sums` vectorises.
NARROW_SUM_ROW = 8


class LoadingRewriter(KernelRewriter):
    """The rewrite of the module docstring for the planned convolutions (`ShareDenseScale` extends it)."""

    def __init__(self, mod, planned, pooled_only, maxima, passing=(), separable=False):
        super().__init__(mod)
        self.separable = separable  # window sums along rows, then columns: True, or "narrow" (`window_sums`)
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
        if diagonal.repr == Moment.VAR:  # its variance alone: a sum of its means would be read by nothing
            diagonal = GaussianValue(diagonal.moment)
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
        elif loads[0] is not None and spatial_mean(spec, shape_of(operands[0].mean)) and operands[0].repr == Moment.VAR:
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
        output (ResNet-8 on Cortex-M4: the window sums 9.29 M -> 3.07 M instructions).
        ``"narrow"`` (SIMD targets): only where a row has fewer than NARROW_SUM_ROW taps, too few
        for the one kernel's rows of partial sums to vectorise (`schedule._partial_sums`), which
        left each of the 3x3 sums a chain of dependent additions: DS-CNN's 25x5 maps (see
        benchmarks/host_kernels.md, session 14)."""
        in_ch = shape_of(x.mean)[1]
        pads, _ = self._window_extent(x, kernel_shape, attrs, out_shape)
        out_h, out_w = out_shape[2:]
        strides, dilations = attrs["strides"], attrs["dilations"]
        if not (self.separable is True or (self.separable == "narrow" and out_w < NARROW_SUM_ROW)):
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
        """``separable_sums``: window sums along rows, then columns (`LoadingRewriter.window_sums`; fewer
        additions, one more kernel and its small buffer: `pipeline.for_target` asks for it on cores
        without SIMD, and ``"narrow"``, for rows too short to vectorise, on application cores)."""
        if mode not in COVARIANCE_MODES:
            raise PfpcError(f"--covariance {mode!r}: one of {', '.join(COVARIANCE_MODES)}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise PfpcError(f"--covariance-budget {budget!r}: a non-negative fraction of the diagonal PFP's work (0.5 = 50 %)")
        self.mode, self.budget, self.separable_sums = mode, float(budget), separable_sums
        self.planned_convs = 0

    def transform_module(self, mod, ctx):
        graph = CovarianceGraph.of(mod)
        planned = plan(mod, self.mode, self.budget, graph)
        self.planned_convs = len(planned)
        if not planned:
            return mod  # nothing reaches a pool: the diagonal PFP, unchanged
        mod = LoadingRewriter(mod, planned, self.mode == "pooled", self.mode == "channel", graph.passing, self.separable_sums).run()
        record = {"option": self.mode, "mode": "pooled" if self.mode == "pooled" else "channel", "budget": self.budget,
                  "convolutions": [var.name for var in planned]}
        mod["main"] = with_attrs(mod["main"], ir_state.encode(covariance=record))
        return mod
