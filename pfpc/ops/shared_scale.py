"""Gaussian operators of the shared dense-layer scale (``--shared-scale``, docs/covariance.md
"The seed LeNet-5 on Fashion-MNIST"), emitted by `passes.share_dense_scale` only.

A dense layer u = W x + b with noise-dominated weights (std >> |mean|) has, given its input x,
the conditional noise variance c_j = sum_i s2_ji x_i^2 + s2_bj per unit. The convolutions'
shared weight noise moves the whole feature vector's energy up or down together, so every unit's
c_j moves with one random scale lam (E lam = 1): u's variance is lam times the PFP's. The pass
predicts kappa = Var(lam) per input row from the last convolution's per-channel loadings
(x = relu(y), y_i = m_i + a_i z_c + e_i, z_c ~ N(0, 1) per channel, e_i ~ N(0, v_i - a_i^2)),

    kappa = sum_c Var_z(S_c(z)) + sum_c E_z[I_c(z)],
    S_c(z) = sum_{i in c} alpha_i G_i(z),   I_c(z) = sum_{i in c} alpha_i^2 (F_i(z) - G_i(z)^2),
    alpha_i = (1/J) sum_j s2_ji / E[c_j],

G_i(z), F_i(z) the second and fourth raw moments of relu(y_i) given z, the expectation over z by
Gauss-Hermite nodes (`feature_scale_sums`, `mixture`, then a sum over channels), and runs the
layers after the dense one in two scenarios of lam beside the diagonal PFP's own (lam = 1):
three rows (`scale_points`, `scale_scenarios`), mixed at the outputs with the diagonal scenario's means
(`mixture`). Each operator here is one TE compute with at most one reduction.
"""

from __future__ import annotations

from tvm import te, tirx

from .gaussian import Gaussian, _broadcast_index, _pair_sum, maxpool2d
from .moments import f32, pdf_exponent, safe_ratio, safe_sqrt, std_normal_cdf, std_normal_pdf

SCENARIOS = 3  # the diagonal PFP (lam = 1, p = 0) and the two points of the scale


def feature_scale_sums(x: Gaussian, loading: Gaussian, alpha: Gaussian, nodes: Gaussian, pool=None) -> Gaussian:
    """Per row n, channel c and node z_q (operand ``nodes`` [Q]) of pre-activations x [N, C, ...]
    with per-channel loadings a (``loading``) and weights alpha (deterministic, both x's shape):

        mean[n, c, q] = sum_{i in c} alpha_i G_i(z_q)
        var[n, c, q]  = sum_{i in c} alpha_i^2 (F_i(z_q) - G_i(z_q)^2)

    with y_i | z ~ N(m_i + a_i z, e_i), e_i = max(v_i - a_i^2, 0), s = sqrt(e_i), t = (m_i + a_i z) / s,
    and relu(y)'s raw moments by the truncated-normal recursion
    I1 = mu Phi(t) + s phi(t), I2 = mu I1 + e Phi(t), I3 = mu I2 + 2 e I1, I4 = mu I3 + 3 e I2
    (G = I2, F = I4, each clamped at 0). Output [N, C, Q], the second component a variance.
    ``pool`` (kernel, strides, pads, dilations, ceil_mode): x and a are a max-pool's inputs, and the
    pre-activations its correlated maxima and their loadings (`gaussian.maxpool2d` with loadings),
    computed in this kernel once per feature for all nodes."""
    if pool is not None:
        x, loading = maxpool2d(x, *pool, loading=loading, loading_out="with_moments")
    shape = list(x.shape)
    count = int(nodes.shape[0])
    spatial = [te.reduce_axis((0, size), name=f"p{axis}") for axis, size in enumerate(shape[2:])]

    def body(n, c, q):
        idx = (n, c, *spatial)
        a = loading.mean[idx]
        independent = tirx.max(x.var_at(idx) - a * a, f32(0.0))
        std = safe_sqrt(independent)
        mean = x.mean[idx] + a * nodes.mean[q]
        t = safe_ratio(mean, std)
        pdf = std_normal_pdf(t, pdf_exponent(t))
        cdf = std_normal_cdf(t, pdf)
        first = mean * cdf + std * pdf
        second = mean * first + independent * cdf
        third = mean * second + f32(2.0) * independent * first
        fourth = mean * third + f32(3.0) * independent * second
        second, fourth = tirx.max(second, f32(0.0)), tirx.max(fourth, f32(0.0))
        weight = alpha.mean[idx]
        return _pair_sum()((weight * second, weight * weight * (fourth - second * second)), axis=spatial)

    mean, var = te.compute([shape[0], shape[1], count], body, name="feature_scale_sums")
    return Gaussian(mean, var, "var")


def mixture(x: Gaussian, probability: Gaussian, axis: int, mean_of_first: bool = False) -> Gaussian:
    """The moment-matched mixture of the components x[..., k, ...] along ``axis`` with
    probabilities p (deterministic, broadcast to x's shape, summing to 1 along ``axis``):

        mean = sum_k p_k m_k,   var = sum_k p_k (v_k + (m_k - m_0)^2) - (mean - m_0)^2

    (the raw second moment taken about the first component's mean m_0: the same value as
    sum_k p_k (v_k + m_k^2) - mean^2, without its cancellation when the components are close).
    ``mean_of_first``: the output mean is m_0 instead (the shared scale's outputs: component 0 is
    the diagonal PFP's scenario, p_0 = 0, whose means were measured closer to Monte Carlo's than
    the two-point mixture's); the variance stays the mixture's. Output: x's shape without ``axis``."""
    shape = list(x.shape)
    out_shape = shape[:axis] + shape[axis + 1:]
    k = te.reduce_axis((0, shape[axis]), name="k")

    def full(idx, component):
        return tuple(idx[:axis]) + (component,) + tuple(idx[axis:])

    def body(*idx):
        source = full(idx, k)
        p = probability.mean[_broadcast_index(probability.shape, shape, source)]
        offset = x.mean[source] - x.mean[full(idx, 0)]
        return _pair_sum()((p * offset, p * (x.var_at(source) + offset * offset)), axis=[k])

    shift, second = te.compute(out_shape, body, name="mixture_sums")
    if mean_of_first:
        mean = te.compute(out_shape, lambda *idx: x.mean[full(idx, 0)], name="mixture_mean")
    else:
        mean = te.compute(out_shape, lambda *idx: x.mean[full(idx, 0)] + shift[idx], name="mixture_mean")
    var = te.compute(out_shape, lambda *idx: tirx.max(second[idx] - shift[idx] * shift[idx], f32(0.0)), name="mixture")
    return Gaussian(mean, var, "var")


def scale_points(kappa: Gaussian, part: str) -> Gaussian:
    """Three scenarios (p_k, lam_k) per row: k = 0 the diagonal PFP's (lam = 1, p = 0: its means
    are the outputs', `mixture`'s ``mean_of_first``), k = 1, 2 the two points of a scale with
    E[lam] = 1 and Var[lam] = r, r = max(kappa's variance, 0) (kappa: a Gaussian [N] whose
    variance is Var(lam) per row):

        r <= 1: p = (1/2, 1/2),           lam = (1 - sqrt(r), 1 + sqrt(r))
        r > 1:  p = (r, 1) / (1 + r),     lam = (0, 1 + r)

    ``part`` "probability": p, "scale": lam; deterministic output [3, N]."""
    (rows,) = kappa.shape

    def body(k, n):
        r = tirx.max(kappa.var_at((n,)), f32(0.0))
        small = r <= f32(1.0)
        if part == "probability":
            first = tirx.Select(small, f32(0.5), r / (f32(1.0) + r))
            return tirx.Select(k == 0, f32(0.0), tirx.Select(k == 1, first, f32(1.0) - first))
        root = tirx.sqrt(r)
        point = tirx.Select(k == 1, tirx.max(f32(1.0) - root, f32(0.0)), f32(1.0) + tirx.Select(small, root, r))
        return tirx.Select(k == 0, f32(1.0), point)

    return Gaussian(te.compute([SCENARIOS, rows], body, name=f"scale_points_{part}"), None, "none")


def scale_scenarios(x: Gaussian, scale: Gaussian) -> Gaussian:
    """x [N, ...] in K scenarios of its variance, lam [K, N] (deterministic): output [K, N, ...]
    with mean m[n, ...] and variance v[n, ...] lam[k, n]."""
    scenarios = int(scale.shape[0])
    shape = [scenarios] + list(x.shape)
    mean = te.compute(shape, lambda k, *idx: x.mean[idx], name="scale_scenarios_mean")
    var = te.compute(shape, lambda k, *idx: x.var_at(idx) * scale.mean[k, idx[0]], name="scale_scenarios")
    return Gaussian(mean, var, "var")


def inverse_noise(noise: Gaussian, bias: Gaussian) -> Gaussian:
    """1 / (c + s2_b) (deterministic; 0 where c + s2_b = 0, a unit without noise): c [N, J] a
    dense layer's noise variance sum_i s2_ji E[x_i^2], s2_b [J] its bias variance."""
    def body(*idx):
        total = noise.mean[idx] + bias.mean[_broadcast_index(bias.shape, noise.shape, idx)]
        return tirx.Select(total > f32(0.0), safe_ratio(f32(1.0), total), f32(0.0))

    return Gaussian(te.compute(noise.shape, body, name="inverse_noise"), None, "none")
