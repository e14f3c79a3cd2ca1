"""Give a noise-dominated dense layer after a convolution chain one random scale shared by all its units (``--shared-scale``).

Where a dense layer's weights are mostly noise (the seed LeNet-5's fc1: std/|mean| 37-52), its
pre-activation u_j has, given its input x, the noise variance c_j = sum_i s2_ji x_i^2 + s2_bj.
The last convolution's weight noise, the same at every position of a channel, moves the whole
feature vector's energy up or down together, so all c_j move with one scale lam (E lam = 1):
the layers after the dense one see a scale mixture, whose heavy tails the diagonal PFP averages
away (docs/covariance.md, "The seed LeNet-5 on Fashion-MNIST"). The rewrite (one row of a batch;
each row its own kappa):

    conv -> [bias] -> maxpool -> relu -> flatten -> dense -> [bias] -> tail -> outputs
    becomes
    conv -> [bias] -> maxpool -> relu -> flatten = x -> dense -> [bias] = u  (the diagonal PFP's moments; the dense
      |                                 layer as add_variance(x @ mu, c), its noise c = raw_second_moment(x) @ s2 apart)
      |  a = the conv's per-channel loading (`CarryChannelCovariance`'s, "pooled": variances unchanged)
      +-> alpha  = (inverse_noise(c, s2_b) @ s2^T) / J
          sums   = feature_scale_sums(the max-pool's input, a, alpha, Gauss-Hermite nodes)   [N, C, Q]
                   (in its kernel: the correlated maxima y and their loadings a_y, the features' pre-activations)
          kappa  = var of reduce_sum(mixture(sums, node weights), channels)  Var(lam) per row
          p, lam = scale_points(kappa)                                      [3, N] each
      u3   = scale_scenarios(u, lam) viewed [3N, J]      (variance times lam_k: lam_0 = 1, the diagonal PFP's, and the two points)
      tail = the same layers on [3N, ...]
      each output: mixture(tail's output viewed [3, N, ...], p)   mean m_0 (the diagonal PFP's),
                                                                var sum p (v + m^2) - (sum p m)^2

(ops in `pfpc.ops.shared_scale`; without a max-pool the ReLU reads the convolution's output, and
y, a_y are that output and its loading; with one, `feature_scale_sums` runs the max-pool's Clark
steps with the window's correlation, `gaussian.maxpool2d`, once per feature for all nodes). The outputs keep the diagonal PFP's means (scenario 0,
lam = 1, weight 0): measured on the seed LeNet-5 with Fashion-MNIST, the two-point mixture's own
means were further from Monte Carlo's (0.081 MC standard deviations against 0.051; a log-normal
scale in 5 scenarios: 0.072), while its variance is the one that matches (docs/covariance.md).
A linear tail gives exactly the diagonal PFP's moments: the scenarios' means are equal and
sum_k p_k lam_k = 1.

Where it applies: a dense layer (MatMul/Gemm, Gaussian weights [in, out]) reading the flattened
ReLU of a convolution (through an optional bias add and max-pool), the layers after it (up to
the outputs) row-wise (dense layers, element-wise ops with weights, activations; no views) and
reading nothing from before it. ``auto``: the weights noise-dominated (median std/|mean| >= 10) and
the estimated extra Cortex-M4 instructions (`extra_fraction`) within ``budget`` of the diagonal
PFP's; ``on``: wherever the layout matches; ``off``: never. `ShareDenseScale.reasons` says why it
did not apply (as onnxscript's rewriter does). Not combined with ``--covariance`` loadings: when
`CarryChannelCovariance` placed any, the module is returned unchanged (and `pipeline.default_passes`
turns ``auto`` off under ``--covariance none``, the diagonal PFP asked for). Runs after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from .. import ir_state
from ..errors import PfpcError
from ..ir import GaussianValue, call_op_name, kernel_of, main_bindings, output_fields, shape_of, with_attrs
from ..ops.gaussian import Moment
from ..ops.kernel import KernelSpec, infer_output_repr
from ..ops.registry import STAGES, Fusion
from ..ops.shared_scale import SCENARIOS
from .carry_channel_covariance import DEFAULT_BUDGET, LoadingRewriter
from .covariance_graph import CovarianceGraph
from .kernel_rewriter import KernelRewriter

SHARED_SCALE_MODES = ("auto", "on", "off")
NODES = 5  # Gauss-Hermite nodes over each channel's latent (3: kappa 0.28x too small on the seed LeNet-5; 5 and 7 alike)
# auto: the median over the dense weights of std / |mean| at least this (a typical weight's noise
# variance 100x its mean's square: the units' variance is then nearly all the conditional noise
# variance that the shared scale moves; the seed LeNet-5's fc1: 37, where the digits LeNet's
# fc1, 2.5, keeps the diagonal PFP). A median, not a ratio of sums: the seed's fc1 has
# sum s2 / sum mu^2 = 8 only, from a few large means
NOISE_DOMINATED = 10.0

# Cortex-M4 instructions of the scale's own kernels (QEMU profile of the seed LeNet-5, batch 1,
# benchmarks/shared_scale_compiled.md): per feature and node of `feature_scale_sums` (161,640 for
# 400 x 5), per deterministic multiply-add of alpha's pass over the dense weights (121,120 per
# 48,000; the noise c is the dense layer's own variance term, computed once), per output and
# window element of the correlated max-pool with its maxima's loadings that `feature_scale_sums`
# runs in its kernel (its 302,320 less the nodes' 161,640, for 400 outputs of 2x2 windows)
_PER_NODE = 81.0
_PER_DETERMINISTIC_MAC = 2.5
_PER_POOLED_TAP = 88.0


@dataclass
class Site:
    """Where the scale applies: kernel-call vars of the original ``main``."""

    conv: relax.Var
    pool: relax.Var | None  # the max-pool between the convolution and the ReLU, if any
    relu: relax.Var
    dense: relax.Var
    scaled: relax.Var  # the dense layer's output after its bias add: what the scenarios scale
    tail: list = field(default_factory=list)  # the kernels after ``scaled``, in order
    noise_ratio: float = 0.0  # the median std / |mean| of the dense weights


def _single_source(calls, var):
    sources = calls[var][1]
    return sources[0] if len(sources) == 1 else None


def _is_weight(func, expr) -> bool:
    num_input = int(func.attrs["num_input"])
    return isinstance(expr, relax.Var) and any(expr.same_as(p) for p in func.params[num_input:])


def find_site(mod, mode: str, graph: CovarianceGraph | None = None):
    """(the `Site`, None) where the scale applies, else (None, the reason it does not)."""
    func = mod["main"]
    graph = graph or CovarianceGraph.of(mod)
    order, calls, users = graph.order, graph.calls, graph.users
    weights = ir_state.means(func)
    reasons = []
    for var in order:
        spec, sources, binding = calls[var]
        if spec.ops[0] != "matmul" or len(spec.stages) != 1:
            continue
        name = var.name
        fields = list(binding.value.args[1].fields)
        if spec.operands != (Moment.VAR, Moment.VAR) or not _is_weight(func, fields[2]) or len(shape_of(fields[2])) != 2:
            reasons.append(f"{name}: not a Gaussian input times Gaussian weights [in, out]")
            continue
        mu, s2 = weights[fields[2].name].astype(np.float64), weights[fields[3].name].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.median(np.where(mu != 0, np.sqrt(s2) / np.abs(mu), np.where(s2 > 0, np.inf, 0.0))))
        if mode == "auto" and ratio < NOISE_DOMINATED:
            reasons.append(f"{name}: its weights are not noise-dominated (median std/|mean| {ratio:.3g} < {NOISE_DOMINATED:g})")
            continue
        relu = _single_source(calls, var)
        if relu is None or calls[relu][0].ops[0] != "relu":
            reasons.append(f"{name}: its input is not a ReLU's output")
            continue
        features = shape_of(fields[0])
        if len(features) != 2 or features[1] != int(np.prod(shape_of(calls[relu][2].value.args[1].fields[0])[1:])):
            reasons.append(f"{name}: its input is not the flattened ReLU")
            continue
        chain = _single_source(calls, relu)
        pool = chain if chain is not None and calls[chain][0].ops[0] == "maxpool2d" else None
        if pool is not None:
            chain = _single_source(calls, pool)
        if chain is not None and calls[chain][0].ops == ["add"] and calls[chain][0].operands[1] != Moment.NONE:
            chain = _single_source(calls, chain)  # the convolution's bias add
        if chain is None or calls[chain][0].ops[0] != "conv2d" or len(shape_of(calls[relu][2].value.args[1].fields[0])) != 4:
            reasons.append(f"{name}: its ReLU does not read a convolution (through a bias add and a max-pool)")
            continue
        scaled = var
        following = users.get(var, [])
        if len(following) == 1 and calls[following[0]][0].ops == ["add"]:
            bias = list(calls[following[0]][2].value.args[1].fields)
            if calls[following[0]][0].operands[0] != Moment.NONE and _is_weight(func, bias[2]):
                scaled = following[0]
        tail, reason = _tail(func, order, calls, users, scaled)
        if reason is not None:
            reasons.append(f"{name}: {reason}")
            continue
        return Site(chain, pool, relu, var, scaled, tail, ratio), None
    return None, "; ".join(reasons) or "no dense layer (MatMul/Gemm with Gaussian weights)"


def _tail(func, order, calls, users, scaled):
    """(the kernel vars after ``scaled``, None) when they can run on the scenarios stacked in the
    batch (row-wise, reading nothing from before ``scaled``), else (None, the reason)."""
    tail, frontier = [], [scaled]
    while frontier:
        for user in users.get(frontier.pop(), []):
            if user not in tail:
                tail.append(user)
                frontier.append(user)
    tail.sort(key=order.index)
    inside = set(tail) | {scaled}
    for var in tail:
        spec, sources, binding = calls[var]
        op = spec.ops[0]
        if len(spec.stages) != 1 or not (op == "matmul" or STAGES[op].fusion in (Fusion.ELEMENTWISE, Fusion.NONLINEAR)):
            return None, f"the layer {var.name} after it is not row-wise (a dense layer, an element-wise op or an activation)"
        if any(source not in inside for source in sources):
            return None, f"the layer {var.name} after it reads a tensor from before it"
        if op == "matmul" and (len(sources) != 1 or _is_weight(func, binding.value.args[1].fields[0])):
            return None, f"the layer {var.name} after it is not activations times weights (it would mix the rows)"
        for arg in binding.value.args[1].fields:
            along_batch = len(shape_of(arg)) > 2 if op == "matmul" else (
                len(shape_of(arg)) >= len(output_shape_of(binding)) and shape_of(arg)[0] != 1)
            if _is_weight(func, arg) and along_batch:
                return None, f"the layer {var.name} after it has a weight along the batch axis"
    owner = {}  # a TupleGetItem var -> its kernel call
    for binding in main_bindings(func):
        value = binding.value
        if isinstance(value, relax.TupleGetItem):
            owner[binding.var] = value.tuple_value
        elif call_op_name(value) == "relax.reshape" and owner.get(value.args[0], value.args[0]) in inside:
            return None, f"a view (reshape) of {owner.get(value.args[0], value.args[0]).name} after it"
    return tail, None


def output_shape_of(binding):
    ty = binding.var.ty
    ty = ty.fields[0] if isinstance(ty, relax.TupleType) else ty
    return [int(d) for d in ty.shape]


def extra_fraction(graph: CovarianceGraph, site: Site) -> float:
    """Estimated extra Cortex-M4 instructions of the scale as a fraction of the diagonal PFP's:
    the convolution's loading (unloaded input), the correlated max-pool with its maxima's
    loadings, alpha's pass over the dense weights, the features' ReLU moments at the
    nodes, and the tail twice more (the scale's two scenarios beside the diagonal one)."""
    calls = graph.calls
    extra = graph.extra_instructions(site.conv)[0]
    pre = output_shape_of(calls[site.pool if site.pool is not None else site.relu][2])
    features = int(np.prod(pre))
    if site.pool is not None:
        extra += features * int(np.prod(calls[site.pool][0].stages[0][1]["kernel"])) * _PER_POOLED_TAP
    weight = shape_of(list(calls[site.dense][2].value.args[1].fields)[2])
    extra += pre[0] * int(np.prod(weight)) * _PER_DETERMINISTIC_MAC
    extra += features * NODES * _PER_NODE
    extra += (SCENARIOS - 1) * graph.diagonal_instructions(site.tail)
    return extra / graph.diagonal_instructions()


class _ScaleRewriter(LoadingRewriter):
    """The rewrite of the module docstring: the convolution's loading as `CarryChannelCovariance`
    makes it in ``pooled`` mode (the variances stay the diagonal PFP's), the kappa kernels beside
    the diagonal PFP, the tail on three scenarios stacked in the batch, the outputs mixed."""

    def __init__(self, mod, site: Site, separable=False):
        super().__init__(mod, [site.conv], pooled_only=True, maxima=False, separable=separable)
        self.site = site
        self.inside = set(site.tail) | {site.scaled}
        self.pre = None  # (the features' pre-activations or the max-pool's inputs, their loadings, the pool's attributes, the features' shape)
        self.noise = None  # the dense layer's noise variance c [N, J] (`dense`)
        self.probability = self.scale = None  # p, lam [SCENARIOS, N]

    def emit(self, stage, attrs, operands, output=None, nodes=()):
        spec = KernelSpec(((stage, attrs),), tuple(o.repr for o in operands), Moment.NONE, nodes=(tuple(nodes),) if nodes else ())
        spec = spec.with_(output=output if output is not None else infer_output_repr(spec))
        self.used.update(arg for operand in operands for arg in operand.args())
        return self.kernels.emit(spec, operands, f"{self.stem}_{stage}", [f"x{i}" for i in range(len(operands))])

    @property
    def stem(self):
        return self.site.dense.name.rsplit("_matmul", 1)[0] + "_shared"

    def gaussian_view(self, value: GaussianValue, shape):
        shape = relax.ShapeExpr([int(d) for d in shape])
        return GaussianValue(self.bb.emit(relax.op.reshape(value.mean, shape)), self.bb.emit(relax.op.reshape(value.moment, shape)), value.repr)

    def _visit(self, binding):
        var, site = binding.var, self.site
        if var.same_as(site.pool if site.pool is not None else site.relu):
            spec, _ = kernel_of(self.mod, binding.value)
            x = self._operands(spec, list(binding.value.args[1].fields))[0]
            loading = self.loaded(x, binding)
            # with a max-pool: its inputs, whose correlated maxima and their loadings
            # `feature_scale_sums` computes in its own kernel (the pool's attributes)
            self.pre = (x, loading, spec.stages[0][1] if site.pool is not None else {}, output_shape_of(binding))
            KernelRewriter._visit(self, binding)  # the diagonal PFP's max-pool or ReLU
            return
        if var.same_as(site.dense):
            self.dense(binding)
            self.kappa(binding)
            return
        super()._visit(binding)
        if var.same_as(site.scaled):
            scaled = self.values[var][0]
            stacked = self.emit("scale_scenarios", {}, [scaled, self.scale])
            shape = shape_of(scaled.mean)
            view = self.gaussian_view(stacked, [SCENARIOS * shape[0]] + shape[1:])
            self.values[var] = (view, "mean")
            self.results[var] = view

    def dense(self, binding):
        """The dense layer as two kernels: x @ mu (its input's variance through the weights'
        means, sum_i v_i mu_ji^2) and the noise c = E[x^2] @ s2, which alpha reads as well,
        added to its variance: the moments of the Gaussian dense kernel, with one pass over the
        weights' variances for both."""
        spec, _ = kernel_of(self.mod, binding.value)
        features, w = self._operands(spec, list(binding.value.args[1].fields))
        attrs = spec.stages[0][1]
        self.noise = self.emit("matmul", attrs, [self.emit("raw_second_moment", {}, [features]), GaussianValue(w.moment)])
        spread = self.emit("matmul", attrs, [features, self.det(w)], nodes=spec.stage_nodes(0))
        result = self.emit("add_variance", {"square": False}, [spread, self.noise])
        self.values[binding.var] = (result, "mean")
        self.results[binding.var] = result

    def kappa(self, binding):
        """p and lam of the scenarios per row, from Var(lam) (the module docstring)."""
        spec, _ = kernel_of(self.mod, binding.value)
        w = self._operands(spec, list(binding.value.args[1].fields))[1]
        s2 = self.weights[w.moment.name].astype(np.float64)
        bias_var = np.zeros(s2.shape[1])
        if not self.site.scaled.same_as(self.site.dense):
            add_spec, _ = kernel_of(self.mod, self.site_binding(self.site.scaled).value)
            bias = self._operands(add_spec, list(self.site_binding(self.site.scaled).value.args[1].fields))[1]
            if bias.repr == Moment.VAR:
                bias_var = self.weights[bias.moment.name].astype(np.float64).reshape(-1)
        stem = self.stem
        inverse = self.emit("inverse_noise", {}, [self.noise, self.weight(f"{stem}.noise_bias", bias_var)])
        alpha = self.emit("matmul", {}, [inverse, self.weight(f"{stem}.alpha_weight", s2.T / s2.shape[1])])
        pre, loading, pool, shape = self.pre
        alpha = self.view(alpha, shape)
        nodes, node_weights = np.polynomial.hermite_e.hermegauss(NODES)
        sums = self.emit("feature_scale_sums", pool, [pre, loading, alpha, self.weight(f"{stem}.nodes", nodes)])
        channels = self.emit("mixture", {"axis": 2}, [sums, self.weight(f"{stem}.node_weights", (node_weights / node_weights.sum()).reshape(1, 1, -1))])
        kappa = self.emit("reduce_sum", {"axes": [1], "keepdims": False}, [channels])
        self.probability = self.emit("scale_points", {"part": "probability"}, [kappa])
        self.scale = self.emit("scale_points", {"part": "scale"}, [kappa])

    def site_binding(self, var):
        return next(b for b in main_bindings(self.func) if b.var.same_as(var))

    def _output(self):
        fields, reprs = [], []
        outputs = output_fields(self.func)
        owner = {b.var: b.value.tuple_value for b in main_bindings(self.func) if isinstance(b.value, relax.TupleGetItem)}
        for repr_ in ir_state.output_moments(self.func):
            mean = outputs.pop(0)
            if repr_ != Moment.NONE:
                outputs.pop(0)
            gauss = self.values[mean][0] if mean in self.values else GaussianValue(mean)
            if owner.get(mean, mean) in self.inside and gauss.repr != Moment.NONE:
                shape = shape_of(gauss.mean)
                rows = shape[0] // SCENARIOS
                scenarios = self.gaussian_view(gauss, [SCENARIOS, rows] + shape[1:])
                probability = self.view(self.probability, [SCENARIOS, rows] + [1] * (len(shape) - 1))
                gauss = self.emit("mixture", {"axis": 0, "mean_of_first": True}, [scenarios, probability])
            fields += gauss.args()
            reprs.append(gauss.repr)
        return relax.Tuple(fields), reprs


@tvm.transform.module_pass(opt_level=0, name="pfpc.ShareDenseScale")
class ShareDenseScale:
    requires = ("pfpc.SubstituteLayers",)
    after = ("pfpc.CarryChannelCovariance",)  # reads whether it placed loadings

    def __init__(self, mode: str = "auto", budget: float = DEFAULT_BUDGET, separable_sums: bool = False):
        """``budget``: the extra Cortex-M4 instructions ``auto`` may add, as a fraction of the
        diagonal PFP's (``--covariance-budget``); ``separable_sums``: as `CarryChannelCovariance`'s."""
        if mode not in SHARED_SCALE_MODES:
            raise PfpcError(f"--shared-scale {mode!r}: one of {', '.join(SHARED_SCALE_MODES)}")
        self.mode, self.budget, self.separable_sums = mode, float(budget), separable_sums
        self.reasons = []  # why it did not apply
        self.site = None

    def transform_module(self, mod, ctx):
        self.reasons, self.site = [], None
        if self.mode == "off":
            return mod
        if ir_state.covariance(mod["main"]) is not None:
            self.reasons.append("--covariance placed per-channel loadings: the shared scale is for the diagonal PFP's dense tail")
            return mod
        graph = CovarianceGraph.of(mod)  # the one `CarryChannelCovariance` read, when it left the module as it was
        site, reason = find_site(mod, self.mode, graph)
        if site is None:
            self.reasons.append(reason)
            return mod
        fraction = extra_fraction(graph, site)
        if self.mode == "auto" and fraction > self.budget:
            self.reasons.append(f"{site.dense.name}: an estimated +{fraction:.0%} Cortex-M4 instructions, over the budget of {self.budget:.0%}")
            return mod
        self.site = site
        mod = _ScaleRewriter(mod, site, self.separable_sums).run()
        record = {"option": self.mode, "mode": "shared_scale", "budget": self.budget, "convolutions": [site.conv.name],
                  "dense": site.dense.name, "nodes": NODES, "noise_ratio": round(site.noise_ratio, 3), "estimated_extra": round(fraction, 4)}
        mod["main"] = with_attrs(mod["main"], ir_state.encode(covariance=record))
        return mod
