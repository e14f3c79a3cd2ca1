"""Gaussian operators of the per-channel shared-noise PFP (``--covariance``, docs/covariance.md).

Every activation is modelled as x[c, p] = m[c, p] + a[c, p] z_c + e[c, p]: z_c ~ N(0, 1) one
latent per channel shared by all positions p (from the weight noise, which is the same at every
position of a convolution), e independent with variance v - a^2. The loading a is a
deterministic (mean-only) tensor beside the Gaussian (m, v); `passes.carry_channel_covariance`
emits these operators, and the deterministic convolutions, products and sums the loadings
need otherwise are pfpc's existing stages with deterministic operands. Each operator here is one
TE compute with at most one reduction (`schedule.schedule_kernel` schedules it as any other).
"""

from __future__ import annotations

import math

from tvm import te, tirx

from .elementwise import _NODES, _WEIGHTS
from .gaussian import ROW_STAGE, Gaussian, _broadcast_index, _reduce_products, _second_at, conv2d_window
from .moments import _let, f32, logistic_slope, pdf_exponent, safe_ratio, safe_sqrt, std_normal_cdf, std_normal_pdf


def _det(shape, body, name) -> Gaussian:
    return Gaussian(te.compute(shape, body, name=name), None, "none")


def conv2d_split(x: Gaussian, w: Gaussian, independent: Gaussian, strides, pads, dilations, groups) -> Gaussian:
    """Y = conv2d(X, W) (NCHW x OIHW, zero padding, grouped) for an input with per-channel
    latents, the variance without the input latents' coherent part:

        mean = sum_{c,t} mu[o,c,t] m[c,p+t]
        var  = sum_{c,t} s2[o,c,t] (m^2 + v)[c,p+t] + sum_{c,t} mu[o,c,t]^2 e[c,p+t]

    with e = v - a^2 the input's independent variance (operand ``independent``, deterministic).
    The coherent part sum_c (sum_t mu a)^2 is added by `add_variance`; with a = 0 this is the
    diagonal `gaussian.conv2d`. Same multiply-adds per MAC as the diagonal convolution."""
    out_shape, axes, tap = conv2d_window(x.shape, w.shape, strides, pads, dilations, groups)

    def terms(n, o, y, xx):
        inside, ix, iw = tap(n, o, y, xx)
        x_mean = tirx.if_then_else(inside, x.mean[ix], f32(0.0))
        x_second = tirx.if_then_else(inside, _second_at(x, ix), f32(0.0))
        x_indep = tirx.if_then_else(inside, independent.mean[ix], f32(0.0))
        w_mean = w.mean[iw]
        if w.repr == "none":
            return x_mean * w_mean, x_indep * (w_mean * w_mean)
        return x_mean * w_mean, w.var_at(iw) * x_second + x_indep * (w_mean * w_mean)

    return _reduce_products(out_shape, terms, axes, "conv2d_split")


def independent_variance(x: Gaussian, loading: Gaussian) -> Gaussian:
    """e = max(v - a^2, 0): the variance of the independent part of x = m + a z + e
    (deterministic output)."""
    return _det(x.shape, lambda *idx: tirx.max(x.var_at(idx) - loading.mean[idx] * loading.mean[idx], f32(0.0)), "independent_variance")


def raw_second_moment(x: Gaussian) -> Gaussian:
    """q = m^2 + v = E[x^2] (deterministic output): what a weight's noise multiplies."""
    return _det(x.shape, lambda *idx: _second_at(x, idx), "raw_second_moment")


def add_variance(y: Gaussian, extra: Gaussian, square: bool) -> Gaussian:
    """(m, v) -> (m, v + c) with c deterministic (``square``: v + c^2), c broadcast over y's
    shape (NumPy): the coherent part of a convolution's variance, the shared part of a global
    pool's (loading^2), a convolution's pooled bias variance L^2 s2_b (one row for every row of
    a batch)."""
    mean = te.compute(y.shape, lambda *idx: y.mean[idx], name="add_variance_mean")

    def var(*idx):
        value = extra.mean[_broadcast_index(extra.shape, y.shape, idx)]
        return y.var_at(idx) + (value * value if square else value)

    return Gaussian(mean, te.compute(y.shape, var, name="add_variance_var"), "var")


def pooled_variance(y: Gaussian, independent_mean: Gaussian, loading: Gaussian, count: int) -> Gaussian:
    """The mean over P = ``count`` positions of x = m + a z + e (one latent per channel, a
    global average pool): mean y.mean = avg m, var = avg(e) / P + avg(a)^2 (the loadings add
    coherently), from ``independent_mean`` = avg(v - a^2) and ``loading`` = avg(a)."""
    mean = te.compute(y.shape, lambda *idx: y.mean[idx], name="pooled_variance_mean")

    def var(*idx):
        value = loading.mean[idx]
        return independent_mean.mean[idx] * f32(1.0 / count) + value * value

    return Gaussian(mean, te.compute(y.shape, var, name="pooled_variance_var"), "var")


def relu_loading(x: Gaussian, loading: Gaussian) -> Gaussian:
    """Loading of max(x, 0): a Phi(m / s) = a E[f'(x)] (Stein's lemma: Cov(f(x), z) = E[f'(x)]
    Cov(x, z); deterministic output). Not clamped to the output's standard deviation: for
    |a| <= s it is within it (Cauchy-Schwarz), and the ReLU's variance would cost as much again
    as the loading (`independent_variance` clamps v - a^2 at 0)."""

    # z and exp's argument as stages of their own on application cores (as `gaussian.relu`'s): each a row
    # loop that vectorises; in one expression gcc branches around the exp (a float-to-int
    # conversion it will not if-convert) and the loop stays scalar. Inlined on Cortex-M, where the
    # stages cost instructions (ResNet-8 on Cortex-M4: +0.12 %)
    z = te.compute(x.shape, lambda *idx: safe_ratio(x.mean[idx], safe_sqrt(x.var_at(idx))), name="relu_loading_z", attrs=ROW_STAGE)
    exponent = te.compute(x.shape, lambda *idx: pdf_exponent(z[idx]), name="relu_loading_exponent", attrs=ROW_STAGE)

    def body(*idx):
        return loading.mean[idx] * std_normal_cdf(z[idx], std_normal_pdf(z[idx], exponent[idx]))

    return _det(x.shape, body, "relu_loading")


def clip_loading(x: Gaussian, loading: Gaussian, lower, upper) -> Gaussian:
    """Loading of min(max(x, lo), hi): a P(lo < x < hi) = a (Phi((hi - m)/s) - Phi((lo - m)/s))
    (Stein; deterministic output). Not clamped to the output's standard deviation: for
    |a| <= s it is within it (Cauchy-Schwarz, Cov(y, z)^2 <= Var(y)), and the clipped
    variance would cost as much again as the loading (`independent_variance` clamps v - a^2 at 0)."""

    def body(*idx):
        mean, var = x.mean[idx], x.var_at(idx)
        std = tirx.max(safe_sqrt(var), f32(1e-30))
        inside = f32(1.0)
        if upper is not None:
            b = (f32(upper) - mean) / std
            inside = std_normal_cdf(b, std_normal_pdf(b))
        if lower is not None:
            a = (f32(lower) - mean) / std
            inside = inside - std_normal_cdf(a, std_normal_pdf(a))
        return loading.mean[idx] * inside

    return _det(x.shape, body, "clip_loading")


def _slope_loading(x: Gaussian, loading: Gaussian, slope, name: str) -> Gaussian:
    """a slope(m, v, s): an activation's output loading, slope = E[f'(x)] (Stein's lemma, as
    `relu_loading`); deterministic output."""
    def body(*idx):
        mean, var = x.mean[idx], x.var_at(idx)
        return loading.mean[idx] * slope(mean, var, tirx.max(safe_sqrt(var), f32(1e-30)))

    return _det(x.shape, body, name)


def _probability_between(mean, std, lower, upper):
    """P(lower < x < upper) for x ~ N(mean, std^2)."""
    b, a = (f32(upper) - mean) / std, (f32(lower) - mean) / std
    return std_normal_cdf(b, std_normal_pdf(b)) - std_normal_cdf(a, std_normal_pdf(a))


def leaky_relu_loading(x: Gaussian, loading: Gaussian, alpha: float) -> Gaussian:
    """Loading of x if x > 0 else alpha x: a (alpha + (1 - alpha) Phi(m / s))."""
    def slope(mean, var, std):
        z = mean / std
        return f32(alpha) + f32(1.0 - alpha) * std_normal_cdf(z, std_normal_pdf(z))

    return _slope_loading(x, loading, slope, "leaky_relu_loading")


def prelu_loading(x: Gaussian, loading: Gaussian, slope: Gaussian, axis: int) -> Gaussian:
    """Loading of x if x > 0 else slope[c] x (a deterministic slope along ``axis``, one element:
    broadcast, as `gaussian.prelu`): a (slope + (1 - slope) Phi(m / s))."""
    broadcast = int(slope.shape[0]) == 1

    def body(*idx):
        mean, var = x.mean[idx], x.var_at(idx)
        z = mean / tirx.max(safe_sqrt(var), f32(1e-30))
        alpha = slope.mean[0] if broadcast else slope.mean[idx[axis]]
        return loading.mean[idx] * (alpha + (f32(1.0) - alpha) * std_normal_cdf(z, std_normal_pdf(z)))

    return _det(x.shape, body, "prelu_loading")


def sigmoid_loading(x: Gaussian, loading: Gaussian) -> Gaussian:
    """Loading of sigmoid(x): a dE[y]/dM of the probit approximation `moments.sigmoid_moments`
    (Stein: E[f'(x)] = dE[f(x)]/dM), E = sigmoid(M / r), r = sqrt(1 + pi V / 8):

        a E (1 - E) / r = a q / (1 + q)^2 / r,   q = e^-|M / r|   (no 1 - E to cancel in a tail)"""
    def slope(mean, var, std):
        spread = tirx.sqrt(f32(1.0) + f32(math.pi / 8.0) * var)
        scaled = mean / spread
        tail = tirx.Var("sigmoid_tail", "float32")  # bound once: a local of the C
        return _let(tail, tirx.exp(f32(0.0) - tirx.max(scaled, f32(0.0) - scaled)), logistic_slope(tail) / spread)

    return _slope_loading(x, loading, slope, "sigmoid_loading")


def tanh_loading(x: Gaussian, loading: Gaussian) -> Gaussian:
    """Loading of tanh(x): a dE[y]/dM of `moments.tanh_moments`' E = tanh(M / r),
    r = sqrt(1 + pi V / 2):

        a (1 - E^2) / r = a 4 q / (1 + q)^2 / r,   q = e^-2|M / r|"""
    def slope(mean, var, std):
        spread = tirx.sqrt(f32(1.0) + f32(math.pi / 2.0) * var)
        scaled = mean / spread
        tail = tirx.Var("tanh_tail", "float32")
        return _let(tail, tirx.exp(f32(-2.0) * tirx.max(scaled, f32(0.0) - scaled)), logistic_slope(tail, scale=4.0) / spread)

    return _slope_loading(x, loading, slope, "tanh_loading")


def hard_sigmoid_loading(x: Gaussian, loading: Gaussian, alpha: float, beta: float) -> Gaussian:
    """Loading of clip(alpha x + beta, 0, 1): a alpha P(lo < x < hi), lo = -beta / alpha,
    hi = (1 - beta) / alpha."""
    lower, upper = -beta / alpha, (1.0 - beta) / alpha
    return _slope_loading(x, loading, lambda mean, var, std: f32(alpha) * _probability_between(mean, std, lower, upper),
                          "hard_sigmoid_loading")


def hard_swish_loading(x: Gaussian, loading: Gaussian, alpha: float, beta: float) -> Gaussian:
    """Loading of x clip(alpha x + beta, 0, 1) (slope 0 below lo = -beta / alpha, 1 above
    hi = (1 - beta) / alpha, 2 alpha x + beta between): with u = (lo - m) / s, w = (hi - m) / s,

        a (1 - Phi(w) + (2 alpha m + beta) (Phi(w) - Phi(u)) + 2 alpha s (phi(u) - phi(w)))

    (E[x 1{lo < x < hi}] = m P + s (phi(u) - phi(w)))."""
    lower, upper = -beta / alpha, (1.0 - beta) / alpha

    def slope(mean, var, std):
        u, w = (f32(lower) - mean) / std, (f32(upper) - mean) / std
        pdf_u, pdf_w = std_normal_pdf(u), std_normal_pdf(w)
        cdf_u, cdf_w = std_normal_cdf(u, pdf_u), std_normal_cdf(w, pdf_w)
        return (f32(1.0) - cdf_w + (f32(2.0 * alpha) * mean + f32(beta)) * (cdf_w - cdf_u)
                + f32(2.0 * alpha) * std * (pdf_u - pdf_w))

    return _slope_loading(x, loading, slope, "hard_swish_loading")


def smooth_loading(x: Gaussian, loading: Gaussian, function) -> Gaussian:
    """Loading of a smooth activation f computed by Gauss-Hermite quadrature (`elementwise.smooth`):
    a E[f'(x)] with E[f'(x)] = E[(f(x) - f(M)) (x - M)] / V (Stein) on the same nodes t_k, weights
    w_k and differences d_k = f(M + sqrt(2V) t_k) - f(M):

        a 2 / (sqrt(pi) sqrt(2V)) sum_k w_k t_k d_k     (0 where V = 0: a is 0 there)

    The plain difference of two values of f, not the activation's difference forms (2-4x the
    cost on Cortex-M4): a slope rounded in a far tail moves only the loading, which is at most the
    output's standard deviation there."""
    def body(*idx):
        mean, var = x.mean[idx], x.var_at(idx)
        spread = tirx.sqrt(f32(2.0) * tirx.max(var, f32(0.0)))
        center = function(mean)
        total = f32(0.0)
        for node, weight in zip(_NODES, _WEIGHTS):
            step = spread * f32(float(node))
            total = total + f32(float(2.0 * weight * node / math.sqrt(math.pi))) * (function(mean + step) - center)
        return tirx.Select(spread > f32(0.0), safe_ratio(loading.mean[idx], spread) * total, f32(0.0))

    return _det(x.shape, body, "smooth_loading")


def square_add(x: Gaussian, y: Gaussian) -> Gaussian:
    """x^2 + y (deterministic; of a Gaussian x its mean is read): the window sums' M^2 + (A^2 + E),
    a loading's a1^2 + a2^2."""
    return _det(x.shape, lambda *idx: x.mean[idx] * x.mean[idx] + y.mean[idx], "square_add")


def _amount(x: Gaussian, idx):
    """A deterministic operand's value, or a Gaussian operand's variance."""
    return x.mean[idx] if x.repr == "none" else x.var_at(idx)


def root(x: Gaussian) -> Gaussian:
    """sqrt(max(d, 0)) (deterministic) of d = x for a deterministic x, d = v for a Gaussian:
    the standard deviation the projection spreads a loading by."""
    return _det(x.shape, lambda *idx: safe_sqrt(_amount(x, idx)), "spread_std")


def projection_gain(pooled: Gaussian, root_sum: Gaussian, diagonal_sum: Gaussian) -> Gaussian:
    """The factor k of the projection of several latents onto one per channel, a = k sqrt(d):
    with the diagonal d the loading is spread by (a convolution's output variance, or a1^2 + a2^2
    at a residual add), the pooled variance T = Var(sum_p x) of the model, S1 = sum_p sqrt(d)
    and S2 = sum_p d,

        k^2 = (T - S2) / (S1^2 - S2)   clipped to [0, 1]   (0 when S1^2 <= S2)

    so that the model's pooled variance (sum_p a)^2 + sum_p (d - a^2) is T and its diagonal d
    (deterministic, one value per channel). Each operand is a deterministic value or a
    Gaussian's variance (T: the variance of the convolution of the window sums, S2: of the sum
    over positions)."""

    def body(*idx):
        s1, s2 = root_sum.mean[idx], _amount(diagonal_sum, idx)
        span = s1 * s1 - s2
        ratio = (_amount(pooled, idx) - s2) / tirx.max(span, f32(1e-30))
        k2 = tirx.Select(span > f32(0.0), tirx.min(tirx.max(ratio, f32(0.0)), f32(1.0)), f32(0.0))
        return tirx.sqrt(k2)

    return _det(pooled.shape, body, "projection_gain")
