"""Gaussian operators added for the operators real embedded networks use (issue 18): each
defined once, its moment formula in its docstring, as a TE compute over `gaussian.Gaussian`.

x ~ N(M, V) element-wise and independent; s = sqrt(V). Exact where a closed form exists
(linear reductions, Exp, Abs, Max/Min of two, HardSigmoid, HardSwish); Gauss-Hermite quadrature
for the smooth activations without one (SiLU, GELU, Softplus, Elu, Selu), whose error against
Monte Carlo is measured in tests/test_new_ops.py and stated in docs/supported_operators.md.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx

from .gaussian import SHARED, Gaussian, Moment, _divide_by_count, _elementwise, _pair_sum, _reduce_products
from .moments import (_GAUSS_LEGENDRE_01, _let, clark_max_moments, clark_tail_ratio, clip_moments, exp_nonpositive, f32, kept, normal_tail_partial_moments, pdf_exponent, product_moments, safe_ratio,
                      safe_sqrt, std_normal_cdf,
                      std_normal_pdf)

#: Gauss-Hermite nodes: exact for polynomials of degree 2 K - 1 times the Gaussian.
HERMITE_POINTS = 16
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(HERMITE_POINTS)
#: Standardised limits beyond which phi is exactly 0 and Phi exactly 0 or 1 (`std_normal_pdf`
#: cuts off at 7.75): clamping keeps z^k phi(z) finite where z = +-inf (zero variance).
_Z_LIMIT = 40.0


def _unary(a: Gaussian, moments, plain, name, native) -> Gaussian:
    """An element-wise operator: ``moments(mean, var)`` -> (E[y], native moment); ``plain``
    the deterministic function for a deterministic input."""
    if a.repr == Moment.NONE:
        return Gaussian(te.compute(a.shape, lambda *idx: plain(a.mean[idx]), name=f"{name}_mean"), None, Moment.NONE)
    mean, moment = te.compute(a.shape, lambda *idx: moments(a.mean[idx], a.var_at(idx)), name=name)
    return Gaussian(mean, moment, native)


# ---------------------------------------------------------------------------------------------
# linear reductions
# ---------------------------------------------------------------------------------------------


def reduce_sum(x: Gaussian, axes, keepdims=True) -> Gaussian:
    """Y = sum of X over ``axes`` (ReduceSum): mean sum(m), variance sum(v) (independent terms).
    Exact. Native output: variance."""
    shape = x.shape
    axes = sorted(axis % len(shape) for axis in axes)
    reduce = {axis: te.reduce_axis((0, shape[axis]), name=f"r{axis}") for axis in axes}
    kept = [axis for axis in range(len(shape)) if axis not in reduce]
    out_shape = [1 if axis in reduce else shape[axis] for axis in range(len(shape))] if keepdims else [shape[a] for a in kept]

    def terms(*idx):
        full = {axis: idx[axis] for axis in kept} if keepdims else dict(zip(kept, idx))
        source = tuple(reduce[axis] if axis in reduce else full[axis] for axis in range(len(shape)))
        return x.mean[source], None if x.repr == Moment.NONE else x.var_at(source)

    total = _reduce_products(out_shape, terms, [reduce[axis] for axis in axes], "sum")
    return _divide_by_count(total, lambda *idx: f32(1.0), "reduce_sum")


# ---------------------------------------------------------------------------------------------
# exact nonlinearities
# ---------------------------------------------------------------------------------------------


def _expm1(value):
    """exp(v) - 1 without the cancellation of exp(v) - 1 for small v (v >= 0)."""
    series = value * (f32(1.0) + value * (f32(0.5) + value * f32(1.0 / 6.0)))
    return tirx.Select(value < f32(1e-3), series, tirx.exp(value) - f32(1.0))


def exp_moments(mean, var):
    """Moments of y = exp(x) (log-normal, exact):

    E[y] = exp(M + V/2),   Var[y] = exp(2M + V) (exp(V) - 1)

    V = 0 gives (exp(M), 0). Returns (E[y], Var[y])."""
    first = tirx.exp(mean + f32(0.5) * var)
    return first, first * first * _expm1(var)


def exp(a: Gaussian) -> Gaussian:
    """Y = exp(X); moments from ``exp_moments``; native output: variance."""
    return _unary(a, exp_moments, tirx.exp, "exp", Moment.VAR)


def abs_moments(mean, var):
    """Mean and variance of y = |x| (folded normal, exact), with z = |M| / s and the upper tail's
    first partial moment psi = E[(Z - z)+] = phi(z) - z Phi(-z) >= 0:

    E[y]   = |M| (2 Phi(z) - 1) + 2 s phi(z) = |M| + 2 s psi
    Var[y] = M^2 + V - E[y]^2 = V (1 - 4 psi (z + psi))

    the second form multiplied out so that no M^2 is formed: for a concentrated input far from 0
    the raw E[y^2] - E[y]^2 = M^2 + V - E[y]^2 lost the variance in float32. V = 0 gives z = inf
    (0 when M = 0), hence exactly |M| and 0. Returns (E[y], Var[y])."""
    std = safe_sqrt(var)
    magnitude = tirx.max(mean, f32(0.0) - mean)
    z = safe_ratio(magnitude, std)
    pdf = std_normal_pdf(z)
    psi = tirx.max(pdf - z * std_normal_cdf(f32(0.0) - z, pdf), f32(0.0))
    return magnitude + f32(2.0) * std * psi, tirx.max(var * (f32(1.0) - f32(4.0) * psi * (z + psi)), f32(0.0))


def abs_(a: Gaussian) -> Gaussian:
    """Y = |X|; moments from ``abs_moments``; native output: variance."""
    return _unary(a, abs_moments, lambda m: tirx.max(m, f32(0.0) - m), "abs", Moment.VAR)


def hard_sigmoid(a: Gaussian, alpha: float, beta: float) -> Gaussian:
    """Y = clip(alpha X + beta, 0, 1) (HardSigmoid): u = alpha x + beta ~ N(alpha M + beta,
    alpha^2 V) is Gaussian, and its clip has the exact moments ``clip_moments``. Native: variance."""

    def moments(mean, var):
        return clip_moments(f32(alpha) * mean + f32(beta), f32(alpha * alpha) * var, 0.0, 1.0)

    def plain(mean):
        return tirx.min(tirx.max(f32(alpha) * mean + f32(beta), f32(0.0)), f32(1.0))

    return _unary(a, moments, plain, "hard_sigmoid", Moment.VAR)


def _truncated_powers(a, b, pdf_a, pdf_b, cdf_a, cdf_b, order):
    """I_j = int_a^b z^j phi(z) dz for j = 0..order (a < b standardised limits, already clamped):
    I_0 = Phi(b) - Phi(a), I_1 = phi(a) - phi(b), I_j = (j - 1) I_{j-2} + a^{j-1} phi(a) - b^{j-1} phi(b)."""
    integrals = [cdf_b - cdf_a, pdf_a - pdf_b]
    power_a, power_b = f32(1.0), f32(1.0)
    for j in range(2, order + 1):
        power_a, power_b = power_a * a, power_b * b
        integrals.append(f32(float(j - 1)) * integrals[j - 2] + power_a * pdf_a - power_b * pdf_b)
    return integrals


def hard_swish_moments(mean, var, alpha, beta):
    """Mean and variance of y = x clip(alpha x + beta, 0, 1) (HardSwish: alpha = 1/6, beta = 1/2),
    alpha > 0, exact: y is 0 below l = -beta/alpha, alpha x^2 + beta x on [l, u], x above
    u = (1 - beta)/alpha. The variance is shift-invariant, so the raw moments are taken of
    y - c, c = f(M) (as in `moments.clip_moments`): with x = M + s z and the truncated moments
    I_k = int z^k phi(z) over each piece (`_truncated_powers`), y - c is a polynomial in z there:

    below l:  -c
    middle:   d2 z^2 + d1 z + d0,  d2 = alpha V, d1 = (2 alpha M + beta) s, d0 = alpha M^2 + beta M - c
    above u:  e1 z + e0,           e1 = s, e0 = M - c

    E[y - c] and E[(y - c)^2] sum the pieces' polynomials against I_k; both are O(V) where
    the mass is (c is the value of the piece holding M), so Var = E[(y-c)^2] - E[y-c]^2 keeps
    float32 precision for a concentrated input (the raw E[y^2] - E[y]^2 lost it all at std 1e-4
    of the weights: the long run's Conv -> HardSwish gave variance 0). V = 0 puts all mass in
    one piece (the function is continuous, so a mean on a breakpoint is exact too).
    Returns (E[y], Var[y])."""
    std = safe_sqrt(var)
    lower, upper = -beta / alpha, (1.0 - beta) / alpha

    def clamp(z):
        return tirx.min(tirx.max(z, f32(-_Z_LIMIT)), f32(_Z_LIMIT))

    a = clamp(safe_ratio(f32(lower) - mean, std))
    b = clamp(safe_ratio(f32(upper) - mean, std))
    pdf_a, pdf_b = std_normal_pdf(a), std_normal_pdf(b)
    cdf_a, cdf_b = std_normal_cdf(a, pdf_a), std_normal_cdf(b, pdf_b)
    i0, i1, i2, i3, i4 = _truncated_powers(a, b, pdf_a, pdf_b, cdf_a, cdf_b, 4)
    center = mean * tirx.min(tirx.max(f32(alpha) * mean + f32(beta), f32(0.0)), f32(1.0))
    d2, d1 = f32(alpha) * std * std, (f32(2.0 * alpha) * mean + f32(beta)) * std
    d0 = (f32(alpha) * mean + f32(beta)) * mean - center
    e0 = mean - center
    upper_tail = f32(1.0) - cdf_b
    h1, h2 = pdf_b, pdf_b * b + upper_tail  # int_b^inf z phi, int_b^inf z^2 phi
    first = (f32(0.0) - center) * cdf_a + d2 * i2 + d1 * i1 + d0 * i0 + e0 * upper_tail + std * h1
    second = (center * center * cdf_a + d2 * d2 * i4 + f32(2.0) * d2 * d1 * i3 + (d1 * d1 + f32(2.0) * d2 * d0) * i2
              + f32(2.0) * d1 * d0 * i1 + d0 * d0 * i0 + e0 * e0 * upper_tail + f32(2.0) * e0 * std * h1 + var * h2)
    mean_out, var_out = center + first, tirx.max(second - first * first, f32(0.0))
    return _hard_swish_below(mean_out, var_out, std, a, b, pdf_a, pdf_b, alpha, beta)


def _hard_swish_below(mean_out, var_out, std, a, b, pdf_a, pdf_b, alpha, beta):
    """`hard_swish_moments` recomputed where the mean lies a >= 1.6 standard deviations below the
    lower breakpoint l and the middle piece spans at least one (b - a = 1 / (alpha s) >= 1).
    There y = 0 but on the upper tail, and the closed form's pieces, O(s^2 a^2 Q(a)) each, cancel
    to a variance O(s^2 phi(a) / a^3) (the long run's seed 100007, 3.2 std below: 1.74e-4 for
    7.37e-5 after a Tanh; the normal CDF's absolute error 7.5e-8 is a large part of it). With
    w = x - l = s (Z - a), v = x - u = s (Z - b) and u = (1 - beta) / alpha:

    y = alpha w^2 - beta w  for w > 0,  less  h(v) = alpha v^2 + (1 - beta) v  for v > 0
    y^2 = (alpha w^2 - beta w)^2  less  alpha^2 v^4 + 2 alpha (2 - beta) v^3
          + ((1 - beta)^2 + 2 u alpha + 2 (1 - beta)) v^2 + 2 u (1 - beta) v  for v > 0

    and E[w^k; w > 0] = s^k psi_k(a), E[v^k; v > 0] = s^k psi_k(b) from
    `moments.normal_tail_partial_moments` (nothing cancels there; the v-part is below
    e^-(b^2 - a^2)/2 of the w-part)."""
    psi_a, bind_a = normal_tail_partial_moments(a, pdf_a)
    psi_b, bind_b = normal_tail_partial_moments(b, pdf_b)
    upper = (1.0 - beta) / alpha
    s1, s2 = std, std * std
    s3, s4 = s2 * std, s2 * s2
    first = f32(alpha) * s2 * (psi_a[2] - psi_b[2]) - f32(beta) * s1 * psi_a[1] - f32(1.0 - beta) * s1 * psi_b[1]
    second = (f32(alpha * alpha) * s4 * psi_a[4] - f32(2.0 * alpha * beta) * s3 * psi_a[3] + f32(beta * beta) * s2 * psi_a[2]
              - (f32(alpha * alpha) * s4 * psi_b[4] + f32(2.0 * alpha * (2.0 - beta)) * s3 * psi_b[3]
                 + f32((1.0 - beta) ** 2 + 2.0 * upper * alpha + 2.0 * (1.0 - beta)) * s2 * psi_b[2]
                 + f32(2.0 * upper * (1.0 - beta)) * s1 * psi_b[1]))
    # a wide input below l (the middle piece narrower than 1 std): `_hard_swish_wide_below`
    wide_first, wide_second = _hard_swish_wide_below(std, a, b, pdf_b, psi_b, alpha, beta)
    # the width u - l = 1 / alpha against std, not b - a: clamped at the z limit, a = b for any
    # input far enough below, and a deterministic one (s = 0) would divide 0 by 0 in the density
    wide = tirx.all(a > f32(0.0), f32(1.0 / alpha) < std, (b - a) * (a + b) <= f32(6.0))
    below = a >= f32(1.6)  # 1.6: where the tail moments hold
    first = tirx.Select(wide, wide_first, first)
    second = tirx.Select(wide, wide_second, second)
    use = tirx.any(wide, below)
    return (bind_a(bind_b(tirx.Select(use, first, mean_out))),
            bind_a(bind_b(tirx.Select(use, tirx.max(second - first * first, f32(0.0)), var_out))))


def _hard_swish_wide_below(std, a, b, pdf_b, psi_b, alpha, beta):
    """(E[y], E[y^2]) of `hard_swish_moments` for a mean below l with the middle piece [l, u]
    narrower than one standard deviation (b - a < 1): the closed form's pieces are O(s^4) about
    M and cancel to the variance (N(-147, 39^2): 0.92 for 0.0157, the long run's seed 700002),
    and `_hard_swish_below`'s w- and v-parts cancel to O((alpha s)^-2). Here every piece is
    positive or small: above u, y = x = u + s (Z - b),

    E[y; x > u] = u Q(b) + s psi1(b),   E[y^2; x > u] = u^2 Q(b) + 2 u s psi1(b) + s^2 psi2(b)

    (psi_k from the tail moments for b >= 1.6, else Q = 1 - Phi(b), psi1 = phi(b) - b Q,
    psi2 = (1 + b^2) Q - b phi(b)), and the middle piece's alpha x^2 + beta x (and its square)
    against the density by 5-point Gauss-Legendre over [l, u] (used where the density changes by
    at most e^3 across it, (b - a)(a + b) <= 6: relative error below 1e-6, as in `clip_moments`).
    Below l, P(x > l) <= 1/2, so E[y^2] - E[y]^2 cancels at most by half."""
    lower, upper = -beta / alpha, (1.0 - beta) / alpha
    cdf_b = std_normal_cdf(b, pdf_b)
    tail_q = f32(1.0) - cdf_b
    far = b >= f32(1.6)
    q = tirx.Select(far, psi_b[0], tail_q)
    psi1 = tirx.Select(far, psi_b[1], pdf_b - b * tail_q)
    psi2 = tirx.Select(far, psi_b[2], (f32(1.0) + b * b) * tail_q - b * pdf_b)
    first = f32(upper) * q + std * psi1
    second = f32(upper * upper) * q + f32(2.0 * upper) * std * psi1 + std * std * psi2
    for node, weight in _GAUSS_LEGENDRE_01:
        z = a + f32(node) * (b - a)  # (x - M) / s at x = l + node (u - l)
        x = f32(lower) + f32(node * (upper - lower))
        value = f32(alpha) * x * x + f32(beta) * x
        density = f32(weight * (upper - lower) / math.sqrt(2.0 * math.pi)) * tirx.exp(f32(-0.5) * z * z) / std
        first, second = first + value * density, second + value * value * density
    return first, second


def hard_swish(a: Gaussian, alpha: float, beta: float) -> Gaussian:
    """Y = X clip(alpha X + beta, 0, 1) (HardSwish, and Mul(x, HardSigmoid(x))); moments from
    ``hard_swish_moments``; native output: variance."""

    def plain(mean):
        return mean * tirx.min(tirx.max(f32(alpha) * mean + f32(beta), f32(0.0)), f32(1.0))

    return _unary(a, lambda m, v: hard_swish_moments(m, v, alpha, beta), plain, "hard_swish", Moment.VAR)


def _clark_min_moments(mean1, var1, mean2, var2):
    """min(x1, x2) = -max(-x1, -x2), so from Clark's max (exact, and the variance is computed
    directly, never as a difference of second moments): E[min] = -E[max(-x1, -x2)],
    Var(min) = Var(max(-x1, -x2))."""
    max_mean, max_var = clark_max_moments(f32(0.0) - mean1, var1, f32(0.0) - mean2, var2)
    return f32(0.0) - max_mean, max_var


def _binary_extreme(a: Gaussian, b: Gaussian, moments, plain, name) -> Gaussian:
    if a.repr == Moment.NONE and b.repr == Moment.NONE:
        return _elementwise(a, b, lambda i, j: plain(a.mean[i], b.mean[j]), None, name)
    result = _elementwise(a, b, lambda i, j: moments(a.mean[i], a.var_at(i), b.mean[j], b.var_at(j))[0],
                          lambda i, j: moments(a.mean[i], a.var_at(i), b.mean[j], b.var_at(j))[1], name)
    return Gaussian(result.mean, result.moment, Moment.VAR)


def maximum(a: Gaussian, b: Gaussian) -> Gaussian:
    """Y = max(A, B) element-wise (NumPy broadcasting) for independent A, B: Clark's exact
    moments (`moments.clark_max_moments`). Native output: variance."""
    return _binary_extreme(a, b, clark_max_moments, tirx.max, "maximum")


def minimum(a: Gaussian, b: Gaussian) -> Gaussian:
    """Y = min(A, B) element-wise for independent A, B: exact (``_clark_min_moments``). Native
    output: variance."""
    return _binary_extreme(a, b, _clark_min_moments, tirx.min, "minimum")


def reduce_max(x: Gaussian, axes, keepdims=True) -> Gaussian:
    """Y = max of X over ``axes`` (ReduceMax, GlobalMaxPool): Clark's max of two Gaussians
    applied pairwise in row-major order over the reduced positions, each intermediate max taken
    as Gaussian with its exact first two moments (Clark 1961; the standard approximation of a
    max of several). Native output: variance."""
    shape = x.shape
    axes = sorted(axis % len(shape) for axis in axes)
    kept = [axis for axis in range(len(shape)) if axis not in axes]
    out_shape = [1 if axis in axes else shape[axis] for axis in range(len(shape))] if keepdims else [shape[a] for a in kept]
    positions = [tuple(p) for p in np.ndindex(*[shape[axis] for axis in axes])]

    def source(position, idx):
        full = {axis: idx[axis] for axis in kept} if keepdims else dict(zip(kept, idx))
        full.update(zip(axes, position))
        return tuple(full[axis] for axis in range(len(shape)))

    if x.repr == Moment.NONE:
        def plain(*idx):
            value = x.mean[source(positions[0], idx)]
            for position in positions[1:]:
                value = tirx.max(value, x.mean[source(position, idx)])
            return value

        return Gaussian(te.compute(out_shape, plain, name="reduce_max_mean"), None, Moment.NONE)
    def first(*idx):
        here = source(positions[0], idx)
        return x.mean[here], x.var_at(here)

    # each step a stage of its own (`gaussian.SHARED`): inlined, every step would repeat the last twice
    acc_mean, acc_var = te.compute(out_shape, first, name="reduce_max_0", attrs=SHARED)
    def clark_step(k, acc_mean, acc_var, position):
        """Its terms (spread, alpha, exponent, phi, Phi) each a stage of its own that both moments
        read, as in `gaussian.maxpool2d`: inlined, TVM's lowering grows with each step (a
        2x2x2 maximum compiled in 44 s instead of 4)."""

        def stage(name, body):
            return te.compute(out_shape, body, name=f"reduce_max_{name}_{k}", attrs=SHARED)

        def element(idx):
            here = source(position, idx)
            return x.mean[here], x.var_at(here)

        spread = stage("spread", lambda *idx: safe_sqrt(acc_var[idx] + element(idx)[1]))
        alpha = stage("alpha", lambda *idx: safe_ratio(acc_mean[idx] - element(idx)[0], spread[idx]))
        exponent = stage("exponent", lambda *idx: pdf_exponent(alpha[idx]))
        pdf = stage("pdf", lambda *idx: std_normal_pdf(alpha[idx], exponent[idx]))
        cdf = stage("cdf", lambda *idx: std_normal_cdf(alpha[idx], pdf[idx]))
        tail = stage("tail", lambda *idx: clark_tail_ratio(alpha[idx]))

        def step(*idx):
            return clark_max_moments(acc_mean[idx], acc_var[idx], *element(idx),
                                     (spread[idx], cdf[idx], pdf[idx], alpha[idx], tail[idx]))

        return step

    for k, position in enumerate(positions[1:], 1):
        acc_mean, acc_var = te.compute(out_shape, clark_step(k, acc_mean, acc_var, position), name=f"reduce_max_{k}",
                                       attrs=SHARED)
    return Gaussian(acc_mean, acc_var, Moment.VAR)


# ---------------------------------------------------------------------------------------------
# smooth activations by Gauss-Hermite quadrature
# ---------------------------------------------------------------------------------------------


def silu(x):
    """SiLU: x sigmoid(x)."""
    return x / (f32(1.0) + tirx.exp(f32(0.0) - x))


#: depth of Laplace's continued fraction for the normal lower tail (`normal_cdf`): relative error
#: below 1e-7 for z >= 2.5
_TAIL_FRACTION_DEPTH = 16


def normal_cdf(x):
    """Phi(x) to float32's relative precision for any x: 0.5 (1 + erf(x / sqrt 2)) for x >= -2.5
    (1 + erf cancels below: 1 % of Phi(-8)), Laplace's continued fraction beyond,

    Phi(-z) = phi(z) / (z + 1 / (z + 2 / (z + 3 / (z + ...))))   (16 levels)"""
    def tail(z):
        fraction = z
        for level in range(_TAIL_FRACTION_DEPTH, 0, -1):
            fraction = z + f32(float(level)) / fraction
        return f32(1.0 / math.sqrt(2.0 * math.pi)) * tirx.exp(f32(-0.5) * z * z) / fraction

    lower = _with("cdf_tail_z", tirx.max(f32(0.0) - x, f32(2.5)), tail)
    return tirx.Select(x < f32(-2.5), lower, f32(0.5) * (f32(1.0) + tirx.erf(x * f32(1.0 / math.sqrt(2.0)))))


def gelu(x):
    """GELU: x Phi(x) (`normal_cdf`)."""
    return _with("gelu_x", x, lambda x: x * normal_cdf(x))


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3)
    (the sigmoid form: 1 + tanh(u) in float32 kept nothing of the lower tail)."""
    return x / (f32(1.0) + tirx.exp(f32(-2.0 * math.sqrt(2.0 / math.pi)) * (x + f32(0.044715) * x * x * x)))


def softplus(x):
    """Softplus: log(1 + e^x)."""
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow for large |x|, and e^-20 kept
    # (log(1 + e^-20) is log(1) in float32)
    return _with("softplus_x", x, lambda x: tirx.max(x, f32(0.0)) + _log1p(tirx.exp(f32(0.0) - tirx.max(x, f32(0.0) - x))))


def elu(alpha, gamma=1.0):
    """Elu (gamma = 1) and Selu: gamma x for x > 0, gamma alpha (e^x - 1) else."""
    def function(x):
        negative = f32(alpha) * (tirx.exp(tirx.min(x, f32(0.0))) - f32(1.0))
        return f32(gamma) * tirx.Select(x > f32(0.0), x, negative)

    return function


def _expm1_any(value):
    """e^v - 1 for any v: the Taylor polynomial to v^5 for |v| < 0.1 (relative error below
    2e-8), exp(v) - 1 beyond (below 7e-7): exp(v) - 1 alone lost eps / |v| of it near 0."""
    return _with("expm1_arg", value, lambda value: tirx.Select(_abs(value) < f32(0.1), _expm1_series(value), tirx.exp(value) - f32(1.0)))


def _expm1_series(value):
    """e^v - 1 by its Taylor polynomial to v^5 (relative error below 2e-8 for |v| < 0.1)."""
    return value * (f32(1.0) + value * (f32(0.5) + value * (f32(1.0 / 6.0) + value * (f32(1.0 / 24.0) + value * f32(1.0 / 120.0)))))


def _with(name, value, body):
    """``body(v)`` with v bound once to ``value`` (a Let: a local in the C; TVM neither repeats
    nor simplifies through it)."""
    var = tirx.Var(name, "float32")
    return _let(var, value, body(var))


def _abs(value):
    return tirx.max(value, f32(0.0) - value)  # fabs has no C lowering


def _log1p(value):
    """log(1 + v) for v > -1 without the loss of log(1 + v) for small v: with u = 1 + v rounded,
    log(u) v / (u - 1) (Goldberg's correction for the rounding of u; v itself where u = 1). u is
    bound (a Let), or TVM simplifies u - 1 back to v. (The series to v^8 below |v| < 0.1 instead:
    Softplus 1.6 times the Cortex-M4 instructions, benchmarks/tail_forms_cost.md.)"""
    return _with("log1p_arg", value, lambda value: _with(
        "log1p_u", f32(1.0) + value, lambda rounded: tirx.Select(rounded == f32(1.0), value, tirx.log(rounded) * value / (rounded - f32(1.0)))))


def _sigmoid_pair(x, tail, share=None):
    """(sigmoid(x), sigmoid(-x)) from ``tail`` = e^-|x| (`_sigmoid_tail`, bound by the caller),
    each to float32's relative precision for any x (1 - sigmoid(x) lost the smaller one in a tail).
    ``share``: 1 / (1 + tail), where the caller bound it."""
    share = f32(1.0) / (f32(1.0) + tail) if share is None else share
    return tirx.Select(x >= f32(0.0), share, tail * share), tirx.Select(x >= f32(0.0), tail * share, share)


def _sigmoid_tail(x):
    return tirx.exp(f32(0.0) - _abs(x))


def _sigmoid_step(start_up, start_down, end_up, end_down, rising, shrink):
    """sigmoid(v) - sigmoid(u) for v = u + d from the step d itself, given sigmoid(+-u) and
    sigmoid(+-v) (`_sigmoid_pair`), whether d >= 0 (``rising``: the node's sign, a Python bool)
    and ``shrink`` = expm1(-|d|):

    sigmoid(v) - sigmoid(u) = sigmoid(u) sigmoid(-v) expm1(d)      (d < 0)
                            = -sigmoid(v) sigmoid(-u) expm1(-d)    (d >= 0)

    expm1 of -|d| only (no overflow), and products of factors each kept to float32's relative
    precision, where the difference of two float32 sigmoids lost the step in a tail (e^-80 (e^d - 1)
    is no difference of two values) and near u to the rounding of u + d."""
    return f32(0.0) - end_up * start_down * shrink if rising else start_up * end_down * shrink


# The differences f(M + h) - f(M) of the smooth activations, computed from the step h itself
# (`gauss_hermite_moments`): the difference of the two float32 values lost the step wherever f(M)
# is large against f'(M) h (a concentrated input, and M + h itself rounded) or a far tail (e^-80
# (e^h - 1)). Each is ``difference(M, bind) -> (h, t -> f(M + h) - f(M))``, h = sqrt(2V) t at
# the node t: ``bind(name, value)`` binds a value once per element, shared by the sixteen nodes
# (a value of M, or one the nodes +-t share).


def elu_difference(alpha, gamma=1.0):
    """For `elu` f(x) = gamma max(x, 0) + gamma alpha (e^min(x, 0) - 1): with c = max(M, 0) and
    m = min(M, 0), the linear part changes by max(h + m, -c) and the exponential one by
    e^m expm1(min(h + c, -m)) (1-2 % of the variance of a concentrated input was lost), as
    e^(m + t) - e^m beyond t = 1: for M ~ -130 and h ~ 200, e^h overflowed and e^m was 0 (a NaN
    mean, the long run's seed 700073)."""
    def difference(mean, bind):
        positive, negative = bind("elu_pos", tirx.max(mean, f32(0.0))), bind("elu_neg", tirx.min(mean, f32(0.0)))
        scale = bind("elu_scale", tirx.exp(negative))

        def step_difference(step, node):
            linear = tirx.max(step + negative, f32(0.0) - positive)

            def exponential(shift):  # e^m expm1(t), t <= -m; beyond t = 1 as e^(m + t) - e^m (e^t overflowed, times e^m = 0: NaN)
                series = _expm1_series(shift)
                far = shift > f32(1.0)
                power = tirx.exp(tirx.Select(far, negative + shift, shift))  # one exp per node
                return tirx.Select(_abs(shift) < f32(0.1), scale * series, tirx.Select(far, power - scale, scale * (power - f32(1.0))))

            return f32(gamma) * (linear + f32(alpha) * _with("elu_shift", tirx.min(step + positive, f32(0.0) - negative), exponential))

        return step_difference

    return difference


#: e^-x is a normal float32 for x below 87.3: `_exp_or_zero` computes e^-x up to 87, 0 beyond
_EXP_ZERO_FROM = 87.0
#: |w| up to which `_gated_difference` forms e^-|w(v)| from the start's and the step's factors
_TAIL_PRODUCT_LIMIT = 80.0


def _exp_or_zero(size):
    """e^-x for x >= 0 by `moments.exp_nonpositive` (arithmetic, no libm call), exactly 0 from
    x = 87 on (where e^-x leaves float32's normal range)."""
    inside = tirx.Cast("float32", size < f32(_EXP_ZERO_FROM))
    return exp_nonpositive(tirx.max(f32(0.0) - size, f32(-_EXP_ZERO_FROM))) * inside


def _step_exponential(bind, prefix, index, step):
    """(|d|, P = e^-|d|, expm1(-|d|)) of a node's step d, bound (`gauss_hermite_moments`' ``bind``):
    P by `_exp_or_zero`, expm1(-|d|) as P - 1, by its series below 0.1 (P - 1 lost eps / |d| there)."""
    size = bind(f"{prefix}_step_size{index}", _abs(step))
    power = bind(f"{prefix}_shrink{index}", _exp_or_zero(size))
    return size, power, bind(f"{prefix}_expm1_{index}", tirx.Select(size < f32(0.1), _expm1_series(f32(0.0) - size), power - f32(1.0)))


def softplus_difference(mean, bind):
    """For `softplus`: with a = -|M| <= 0 and g = h (M < 0) or -h (M >= 0), softplus(x) =
    x + softplus(-x) gives

    softplus(M + h) - softplus(M) = h [M >= 0] + softplus(a + g) - softplus(a),
    softplus(a + g) - softplus(a) = log1p(sigmoid(a) expm1(g))   (g <= 1: an argument in (-1/2, 1))

    and the difference of the two values beyond (g > 1: no small difference, and no overflow).
    Near +-80 the two values (M itself, or e^-80) kept 10 % of a concentrated input's variance
    (the long run's seed 600002). No libm exp per node: |g| = |h| is the node's, so with
    P = e^-|h| (`_exp_or_zero`, shared by the nodes +-t) expm1(-|h|) = P - 1 (its series below
    0.1) and expm1(|h|) = -expm1(-|h|) / P (used for |h| <= 1); beyond, e^-|a + g| =
    min(E / P, P / E) with E = e^a (e^-|a + g| itself where |a| or |h| passes 80)."""
    positive = bind("softplus_positive", tirx.Select(mean >= f32(0.0), f32(1.0), f32(0.0)))
    start = bind("softplus_start", f32(0.0) - _abs(mean))
    start_tail = bind("softplus_start_tail", tirx.exp(start))
    start_up = bind("softplus_start_up", start_tail / (f32(1.0) + start_tail))
    start_value = bind("softplus_start_value", softplus(start))
    shared = {}  # |t| -> (|h|, expm1(-|h|), expm1(|h|) (finite), e^-|a + |h||)

    def step_terms(step, key):
        if key not in shared:
            index = len(shared)
            size, power, shrink = _step_exponential(bind, "softplus", index, step)
            # used for |h| <= 1 only: P clamped so that it stays finite beyond
            grow = bind(f"softplus_grow{index}", tirx.Select(size < f32(0.1), _expm1_series(size), (f32(0.0) - shrink) / tirx.max(power, f32(0.25))))
            ratio = bind(f"softplus_ratio{index}", start_tail / power)
            plain = tirx.max(f32(0.0) - start, size) > f32(_TAIL_PRODUCT_LIMIT)
            far_tail = bind(f"softplus_far_tail{index}", tirx.Select(plain, tirx.exp(f32(0.0) - _abs(start + size)), tirx.min(ratio, f32(1.0) / ratio)))
            shared[key] = size, shrink, grow, far_tail
        return shared[key]

    def step_difference(step, node):
        size, shrink, grow, far_tail = step_terms(step, abs(node))
        # g = -h for M >= 0, h else, and h has the node's sign: expm1(g) without a select
        up, down = (shrink, grow) if node > 0 else (grow, shrink)
        expm1 = positive * up + (f32(1.0) - positive) * down

        def tail(shift):
            near = _log1p(start_up * expm1)
            far = tirx.max(start + size, f32(0.0)) + _log1p(far_tail) - start_value  # g = |h| > 1
            return tirx.Select(shift <= f32(1.0), near, far)

        return positive * step + _with("softplus_shift", step - f32(2.0) * positive * step, tail)

    return step_difference


def _gated_difference(mean, bind, prefix, argument=None, argument_step=None):
    """f(M + h) - f(M) for f(x) = x sigmoid(w(x)), with v = M + h and the argument's step
    d = w(v) - w(M) (of the sign of h: w increasing):

    h sigmoid(w(v)) + M (sigmoid(w(v)) - sigmoid(w(M)))   (`_sigmoid_step`)

    ``argument`` w (None: w(x) = x) and ``argument_step(M, v, h)`` = d from h itself; ``prefix``
    names the Lets of the C. No libm call per node: with E = e^-|w(M)| (once per element) and
    P = e^-|d| (`_exp_or_zero`), the end's tail e^-|w(v)| is E P where w moves away from 0, and
    min(E / P, P / E) towards it (E / P short of 0, P / E across it): products of values kept to
    float32's relative precision, free of the rounding of w(M) + d. Where |w(M)| or |d| passes 80
    (E or P no normal float) the tail is e^-|w(v)| itself. expm1(-|d|) is P - 1, its series below
    0.1. The sign of h is the node's, so each node's branch is chosen here. For SiLU
    (d = h) P depends on |h| alone: the nodes +-t share it."""
    start_arg = mean if argument is None else bind(f"{prefix}_arg", argument(mean))
    start_size = bind(f"{prefix}_size", _abs(start_arg))
    # libm's expf beyond 87, where e^-|w(M)| is subnormal (in the products' stead: `_TAIL_PRODUCT_LIMIT`)
    start_tail = bind(f"{prefix}_tail", tirx.Select(start_size < f32(_EXP_ZERO_FROM), _exp_or_zero(start_size), _sigmoid_tail(start_arg)))
    start_up, start_down = _sigmoid_pair(start_arg, start_tail)
    start_up, start_down = bind(f"{prefix}_up", start_up), bind(f"{prefix}_down", start_down)
    shared = {}  # |t| -> the step's (|d|, P, expm1(-|d|), max(|w(M)|, |d|)) for SiLU; t -> those for a cubic w

    def step_terms(arg_step, key):
        if key not in shared:
            index = len(shared)
            size, power, expm1 = _step_exponential(bind, prefix, index, arg_step)
            shared[key] = size, power, expm1, bind(f"{prefix}_far{index}", tirx.max(size, start_size))
        return shared[key]

    def step_difference(step, node):
        rising = node > 0  # h >= 0 (the spread is never negative)
        if argument is None:
            end_arg, (size, power, shrink, far) = bind(f"{prefix}_end{len(shared)}", mean + step), step_terms(step, abs(node))
        else:
            arg_step = bind(f"{prefix}_arg_step{len(shared)}", argument_step(mean, mean + step, step))
            size, power, shrink, far = step_terms(arg_step, node)
            end_arg = start_arg + arg_step
        away = start_arg >= f32(0.0) if rising else start_arg < f32(0.0)
        towards = _with(f"{prefix}_ratio", start_tail / power, lambda ratio: tirx.min(ratio, f32(1.0) / ratio))
        products = tirx.Select(away, start_tail * power, towards)

        def with_tail(end_tail):
            def with_share(share):
                end_up, end_down = _sigmoid_pair(end_arg, end_tail, share)
                return step * end_up + mean * _sigmoid_step(start_up, start_down, end_up, end_down, rising, shrink)

            return _with(f"{prefix}_end_share", f32(1.0) / (f32(1.0) + end_tail), with_share)

        return _with(f"{prefix}_end_tail", tirx.Select(far > f32(_TAIL_PRODUCT_LIMIT), _sigmoid_tail(end_arg), products), with_tail)

    return step_difference


def silu_difference(mean, bind):
    """For `silu` x sigmoid(x) (`_gated_difference` with w(x) = x): silu(-80 + h) - silu(-80) ~
    -79 e^-80 h, and silu(80 + h) - silu(80) ~ h, had nothing of the step left as a difference of
    two float32 values."""
    return _gated_difference(mean, bind, "silu")


def gelu_tanh_difference(mean, bind):
    """For `gelu_tanh` x sigmoid(2 u(x)), u(x) = c (x + k x^3) (c = sqrt(2 / pi), k = 0.044715):
    `_gated_difference` with the argument's step from h itself,
    2 u(v) - 2 u(M) = 2 c h (1 + k (v^2 + v M + M^2))."""
    scale, cubic = f32(2.0 * math.sqrt(2.0 / math.pi)), f32(0.044715)
    return _gated_difference(mean, bind, "gelu", lambda x: scale * (x + cubic * x * x * x),
                             lambda start, end, step: scale * step * (f32(1.0) + cubic * (end * end + end * start + start * start)))


#: terms of the Taylor series of Phi(M + h) - Phi(M) in h (`gelu_difference`): relative error
#: about 1.2e-7 in float32 where |h| (|M| + |h|) <= 1
_GELU_TAYLOR_TERMS = 14
#: |M| beyond which phi(M) = 0 in float32 (`_exp_or_zero`): the series' coefficients are formed at
#: a mean clamped to it, so that they stay finite
_GELU_TAYLOR_CLAMP = 14.0


def gelu_difference(mean, bind):
    """For `gelu` x Phi(x), with v = M + h:

    v Phi(v) - M Phi(M) = h Phi(v) + M (Phi(v) - Phi(M)),

    where |h| (|M| + |h|) <= 1 with D = Phi(v) - Phi(M) from its Taylor series in h,

    D = sum_{n=1}^{14} b_n h^n,   b_n = phi(M) (-1)^(n-1) He_(n-1)(M) / n!

    (phi's derivatives are (-1)^n He_n phi, He the probabilists' Hermite polynomials:
    He_(n+1) = M He_n - n He_(n-1)), the coefficients once per element, so that such a node pays
    a polynomial, no libm call, and Phi(v) = Phi(M) + D; beyond, `normal_cdf` of v and the
    difference of the two Phi values. Two float32 values of Phi near 1 (M = 5) kept nothing of a
    step of 1e-4."""
    start_cdf = bind("gelu_cdf", normal_cdf(mean))
    at = bind("gelu_series_at", tirx.min(tirx.max(mean, f32(-_GELU_TAYLOR_CLAMP)), f32(_GELU_TAYLOR_CLAMP)))
    density = bind("gelu_density", _exp_or_zero(f32(0.5) * at * at) * f32(1.0 / math.sqrt(2.0 * math.pi)))
    coefficients, previous, hermite = [density], f32(1.0), at  # b_1; He_0, He_1
    for n in range(2, _GELU_TAYLOR_TERMS + 1):
        coefficients.append(bind(f"gelu_series{n}", density * f32((-1.0) ** (n - 1) / math.factorial(n)) * hermite))
        if n < _GELU_TAYLOR_TERMS:
            previous, hermite = hermite, bind(f"gelu_hermite{n}", at * hermite - f32(float(n - 1)) * previous)

    def step_difference(step, node):
        series = coefficients[-1]
        for coefficient in reversed(coefficients[:-1]):
            series = coefficient + step * series
        size = step if node > 0 else f32(0.0) - step
        narrow = size * (_abs(mean) + size) <= f32(1.0)
        return _with("gelu_step_cdf", step * series, lambda change: _with(
            "gelu_end_cdf", tirx.Select(narrow, start_cdf + change, normal_cdf(mean + step)),
            lambda end_cdf: step * end_cdf + mean * tirx.Select(narrow, change, end_cdf - start_cdf)))

    return step_difference


def gauss_hermite_moments(function, mean, var, difference=None):
    """Moments of y = f(x), x ~ N(M, V), by Gauss-Hermite quadrature with K = `HERMITE_POINTS`
    nodes t_k and weights w_k (exact for polynomials of degree 2K - 1):

    d_k = f(M + sqrt(2V) t_k) - f(M),   E[y] = f(M) + sum_k w_k d_k / sqrt(pi)
    Var[y] = sum_k w_k d_k^2 / sqrt(pi) - (E[y] - f(M))^2

    (differences from f(M), so a small V loses no precision to cancellation). ``difference``:
    f(M + h) - f(M) computed from h without the cancellation of the two values (the forms above,
    `elu_difference`, `softplus_difference`, ...). V = 0 gives exactly (f(M), 0). The error for
    a given f is measured against Monte Carlo. Returns (E, Var)."""
    # every value used more than once is bound once (a Let: a local in the C), so TVM handles
    # expressions of the size of one difference, not all sixteen nested
    bound = []

    def bind(name, value):
        var = tirx.Var(name, "float32")
        bound.append((var, kept(value)))
        return var

    mean = bind("gh_mean", mean)
    center = function(mean) if difference is not None else bind("gh_center", function(mean))  # bound where used twice
    spread = bind("gh_spread", tirx.sqrt(f32(2.0) * tirx.max(var, f32(0.0))))
    step_difference = None if difference is None else difference(mean, bind)
    first, second = f32(0.0), f32(0.0)
    for k, (node, weight) in enumerate(zip(_NODES, _WEIGHTS)):
        step = spread * f32(float(node))
        delta = bind(f"gh_delta{k}", function(mean + step) - center if difference is None else step_difference(step, float(node)))
        scaled = f32(float(weight / math.sqrt(math.pi))) * delta
        first, second = first + scaled, second + scaled * delta
    first = bind("gh_first", first)

    def wrap(body):
        for var, value in reversed(bound):
            body = _let(var, value, body)
        return body

    return wrap(center + first), wrap(tirx.max(second - first * first, f32(0.0)))


def smooth(a: Gaussian, function, name: str, difference=None) -> Gaussian:
    """Y = f(X) for a smooth activation ``function`` (a TIR expression of x: `silu`, `gelu`,
    `gelu_tanh`, `softplus`, `elu`); moments ``gauss_hermite_moments`` (with ``difference``, its
    f(M + h) - f(M) from h); native output: variance."""
    return _unary(a, lambda m, v: gauss_hermite_moments(function, m, v, difference), function, name, Moment.VAR)


# ---------------------------------------------------------------------------------------------
# data movement and interpolation: linear maps with fixed coefficients, exact
# ---------------------------------------------------------------------------------------------


def gather(x: Gaussian, out_shape, source, name: str) -> Gaussian:
    """Y[i] = X[source(i)] (Slice, Split, Tile, Expand, edge/reflect Pad, nearest Resize): every
    output element is a copy of one input element, so its mean and moment are that element's, in
    the input's representation. Exact. ``source(idx)`` -> the input index (TIR expressions)."""
    mean = te.compute(out_shape, lambda *idx: x.mean[source(idx)], name=f"{name}_mean")
    if x.repr == Moment.NONE:
        return Gaussian(mean, None, Moment.NONE)
    moment = te.compute(out_shape, lambda *idx: x.moment[source(idx)], name=f"{name}_moment")
    return Gaussian(mean, moment, x.repr)


def slice_(x: Gaussian, starts, steps, out_shape) -> Gaussian:
    """Y[i] = X[start + i * step] per axis (Slice, each output of Split): a copy (``gather``)."""
    return gather(x, out_shape, lambda idx: tuple(start + i * step for i, start, step in zip(idx, starts, steps)), "slice")


def tile(x: Gaussian, repeats) -> Gaussian:
    """Y[i] = X[i mod n] per axis (Tile): a copy (``gather``). The repeated elements are copies
    of one random variable (perfectly correlated), which the element-wise moments do not record."""
    shape = x.shape
    out_shape = [size * int(r) for size, r in zip(shape, repeats)]
    return gather(x, out_shape, lambda idx: tuple(tirx.floormod(i, size) for i, size in zip(idx, shape)), "tile")


def broadcast(x: Gaussian, out_shape) -> Gaussian:
    """Y = X broadcast to ``out_shape`` (Expand, NumPy rules): a copy (``gather``)."""
    shape = x.shape
    offset = len(out_shape) - len(shape)

    def source(idx):
        return tuple(0 if size == 1 else idx[offset + axis] for axis, size in enumerate(shape))

    return gather(x, list(out_shape), source, "broadcast")


def border_pad(x: Gaussian, width, mode: str) -> Gaussian:
    """Y = X padded by ``width`` = [before_0, after_0, ...] with ``mode`` "edge" (a padded
    position copies the nearest border element: j = clamp(i - before, 0, n - 1)) or "reflect"
    (mirrored without repeating the border: j = n - 1 - |n - 1 - |i - before||, for pads < n).
    Each output element is a copy of one input element (``gather``). Exact."""
    shape = x.shape
    out_shape = [size + width[2 * axis] + width[2 * axis + 1] for axis, size in enumerate(shape)]

    def index(i, before, size):
        j = i - before
        if mode == "edge":
            return tirx.min(tirx.max(j, 0), size - 1)
        return (size - 1) - tirx.abs((size - 1) - tirx.abs(j))

    return gather(x, out_shape, lambda idx: tuple(index(i, width[2 * a], size) for a, (i, size) in enumerate(zip(idx, shape))),
                  f"{mode}_pad")


def _source_coordinate(out_index, in_size, out_size, mode):
    """ONNX Resize's input coordinate (float32) of output position ``out_index`` along one axis,
    scale = out_size / in_size, as an integer numerator over an integer denominator: one correctly
    rounded division (a ratio like 1/3 as a float constant would be rounded, and printed in the C
    with 7 digits, and floor(3 * 0.3333333) = 0 picks the wrong neighbour)."""

    def ratio(numerator, denominator):
        return numerator.astype("float32") / f32(float(denominator))

    if mode == "half_pixel" or (mode == "pytorch_half_pixel" and out_size > 1):  # (i + 1/2) in / out - 1/2
        return ratio((2 * out_index + 1) * in_size - out_size, 2 * out_size)
    if mode == "pytorch_half_pixel":
        return f32(0.0)
    if mode == "asymmetric":
        return ratio(out_index * in_size, out_size)
    if mode == "align_corners":
        return ratio(out_index * (in_size - 1), out_size - 1) if out_size > 1 else f32(0.0)
    raise ValueError(f"Resize: coordinate transformation {mode}")


def _nearest_index(coordinate, in_size, rounding):
    if rounding == "floor":
        index = tirx.floor(coordinate)
    elif rounding == "ceil":
        index = tirx.ceil(coordinate)
    elif rounding == "round_prefer_ceil":
        index = tirx.floor(coordinate + f32(0.5))
    else:  # round_prefer_floor: a half goes down
        index = tirx.ceil(coordinate - f32(0.5))
    return tirx.min(tirx.max(index.astype("int32"), 0), in_size - 1)


def resize2d(x: Gaussian, out_hw, method: str, mode: str, rounding: str) -> Gaussian:
    """Y = Resize(X) over the last two axes (NCHW; Resize, Upsample), scale = out / in per axis,
    input coordinate c(i) by ONNX's ``coordinate_transformation_mode``:

    nearest: Y[i, j] = X[r(c(i)), r(c(j))] (r: ONNX's rounding, clamped to the input), a copy;
    linear:  c clamped to [0, n - 1], i0 = floor(c), i1 = min(i0 + 1, n - 1), l = c - i0,
             Y = sum_{a, b} u_a w_b X[i_a, j_b] with u = (1 - l, l) (rows) and w (columns):
             mean sum u_a w_b m, var sum (u_a w_b)^2 v (independent inputs; exact).

    Native output: variance (both methods)."""
    batch, chans, height, width = x.shape
    out_h, out_w = out_hw
    out_shape = [batch, chans, out_h, out_w]
    if method == "nearest":
        def source(idx):
            row = _nearest_index(_source_coordinate(idx[2], height, out_h, mode), height, rounding)
            col = _nearest_index(_source_coordinate(idx[3], width, out_w, mode), width, rounding)
            return (idx[0], idx[1], row, col)

        mean = te.compute(out_shape, lambda *idx: x.mean[source(idx)], name="resize_nearest_mean")
        if x.repr == Moment.NONE:
            return Gaussian(mean, None, Moment.NONE)
        var = te.compute(out_shape, lambda *idx: x.var_at(source(idx)), name="resize_nearest_var")
        return Gaussian(mean, var, Moment.VAR)

    def taps(out_index, in_size, out_size):
        coordinate = tirx.min(tirx.max(_source_coordinate(out_index, in_size, out_size, mode), f32(0.0)), f32(in_size - 1))
        low = tirx.floor(coordinate)
        frac = coordinate - low
        low = low.astype("int32")
        return ((low, f32(1.0) - frac), (tirx.min(low + 1, in_size - 1), frac))

    def combine(value_of, squared):
        def body(n, c, y, xx):
            total = f32(0.0)
            for row, row_weight in taps(y, height, out_h):
                for col, col_weight in taps(xx, width, out_w):
                    weight = row_weight * col_weight
                    total = total + (weight * weight if squared else weight) * value_of((n, c, row, col))
            return total

        return body

    mean = te.compute(out_shape, combine(lambda idx: x.mean[idx], False), name="resize_linear_mean")
    if x.repr == Moment.NONE:
        return Gaussian(mean, None, Moment.NONE)
    var = te.compute(out_shape, combine(x.var_at, True), name="resize_linear_var")
    return Gaussian(mean, var, Moment.VAR)


def conv_transpose2d(x: Gaussian, w: Gaussian, strides, pads, dilations, output_padding, groups) -> Gaussian:
    """Y = ConvTranspose(X, W), NCHW x IOHW ([in channels, out channels / groups, kh, kw]),
    grouped: each input element scatters into the output,

        Y[n, o, h s - p_top + i d, w s - p_left + j d] += X[n, c, h, w] W[c, o mod O_g, i, j]

    so an output gathers the input positions h = (y + p_top - i d) / s that are integers inside
    the input. A linear map of independent Gaussian inputs and weights, as a conv: mean sum m_x
    m_w, variance sum Var(x w) (``product_moments``). Exact. Native output: variance."""
    batch, in_ch, height, width = x.shape
    _, out_per_group, kernel_h, kernel_w = w.shape
    in_per_group = in_ch // groups
    pad_top, pad_left, pad_bottom, pad_right = pads
    out_h = (height - 1) * strides[0] - pad_top - pad_bottom + dilations[0] * (kernel_h - 1) + output_padding[0] + 1
    out_w = (width - 1) * strides[1] - pad_left - pad_right + dilations[1] * (kernel_w - 1) + output_padding[1] + 1
    c = te.reduce_axis((0, in_per_group), name="c")
    i = te.reduce_axis((0, kernel_h), name="i")
    j = te.reduce_axis((0, kernel_w), name="j")

    def terms(n, o, y, xx):
        row, col = y + pad_top - i * dilations[0], xx + pad_left - j * dilations[1]
        source_row, source_col = tirx.floordiv(row, strides[0]), tirx.floordiv(col, strides[1])
        inside = tirx.all(row >= 0, tirx.floormod(row, strides[0]) == 0, source_row < height,
                          col >= 0, tirx.floormod(col, strides[1]) == 0, source_col < width)
        channel = (o // out_per_group) * in_per_group + c
        ix, iw = (n, channel, source_row, source_col), (channel, tirx.floormod(o, out_per_group), i, j)
        x_mean = tirx.if_then_else(inside, x.mean[ix], f32(0.0))
        x_moment = None if x.repr == Moment.NONE else tirx.if_then_else(inside, x.moment[ix], f32(0.0))
        return product_moments(x_mean, x_moment, x.repr, w.mean[iw], w.moment_at(iw), w.repr)

    return _reduce_products([batch, out_per_group * groups, out_h, out_w], terms, [c, i, j], "conv_transpose")


# ---------------------------------------------------------------------------------------------
# powers
# ---------------------------------------------------------------------------------------------

#: Largest integer exponent computed exactly (its moments are polynomials of degree 2 p).
MAX_INTEGER_POWER = 6


def _double_factorial(k):
    return math.prod(range(k - 1, 0, -2)) if k > 0 else 1


def _normal_moment(k):
    """E[z^k], z ~ N(0, 1): (k - 1)!! for even k, 0 for odd."""
    return 0 if k % 2 else _double_factorial(k)


def integer_power_moments(mean, var, power):
    """Moments of y = x^p for an integer 0 <= p <= `MAX_INTEGER_POWER`, exact: with x = M + s z,
    x^p = sum_j C(p, j) M^(p-j) s^j z^j, so

    E[y]   = sum_{j even} C(p, j) (j - 1)!! M^(p-j) V^(j/2)
    Var[y] = sum_{t >= 1} V^t M^(2p-2t) sum_{j+k=2t, j,k>=1} C(p,j) C(p,k) (E[z^(j+k)] - E[z^j] E[z^k])

    (each variance term carries V^t, t >= 1: no cancellation for a small V; p = 2 gives
    Var = 4 M^2 V + 2 V^2). Returns (E[y], Var[y])."""
    first = f32(0.0)
    for j in range(0, power + 1, 2):
        term = f32(float(math.comb(power, j) * _normal_moment(j)))
        for _ in range(power - j):
            term = term * mean
        for _ in range(j // 2):
            term = term * var
        first = first + term
    second = f32(0.0)
    for t in range(1, power + 1):
        coefficient = sum(math.comb(power, j) * math.comb(power, 2 * t - j) * (_normal_moment(2 * t) - _normal_moment(j) * _normal_moment(2 * t - j))
                          for j in range(max(1, 2 * t - power), min(power, 2 * t - 1) + 1))
        if coefficient == 0:
            continue
        term = f32(float(coefficient))
        for _ in range(t):
            term = term * var
        for _ in range(2 * power - 2 * t):
            term = term * mean
        second = second + term
    return first, second


def power(a: Gaussian, exponent: float) -> Gaussian:
    """Y = X^p for a constant p >= 0 (Pow with a constant exponent; Sqrt is p = 1/2): an integer
    p up to `MAX_INTEGER_POWER` exactly (``integer_power_moments``); any other p as
    f(x) = max(x, 0)^p by Gauss-Hermite quadrature (``gauss_hermite_moments``), a stated
    approximation that assumes a negligible probability of x < 0 (where ONNX's result is NaN):
    its error against Monte Carlo is in docs/supported_operators.md. Native output: variance."""
    if float(exponent).is_integer() and 0 <= exponent <= MAX_INTEGER_POWER:
        count = int(exponent)

        def plain(mean):
            value = f32(1.0)
            for _ in range(count):
                value = value * mean
            return value

        return _unary(a, lambda m, v: integer_power_moments(m, v, count), plain, "power", Moment.VAR)

    def function(x):
        return tirx.pow(tirx.max(x, f32(0.0)), f32(exponent)) if exponent != 0.5 else tirx.sqrt(tirx.max(x, f32(0.0)))

    return smooth(a, function, "sqrt" if exponent == 0.5 else "power")


# ---------------------------------------------------------------------------------------------
# normalisations over random inputs
# ---------------------------------------------------------------------------------------------


def _normalize(x: Gaussian, gamma: Gaussian, beta: Gaussian, stats_shape, extents, source, stat_of, affine_of, epsilon, name):
    """The normalisation of ``layer_norm``/``group_norm`` (formula there): ``extents`` the sizes
    of the normalised positions of one statistic, ``source(stat_idx, positions)`` the input index
    of one, ``stat_of(idx)`` the statistic of output ``idx``, ``affine_of(idx)`` its gamma/beta
    index. One pass over each group's elements accumulates, with the means shifted by the group's
    first mean K (s = m - K: sums of squared deviations from differences of sums stay free of
    float32 cancellation when the means are close to each other), sum s, sum s^2, sum v,
    sum s v and sum s^2 v; the deviations c = m - mbar = s - sbar then give sum c^2,
    sum c v = sum s v - sbar sum v and sum c^2 v = sum s^2 v - 2 sbar sum s v + sbar^2 sum v."""
    count = float(np.prod(extents))
    sums5 = te.comm_reducer(lambda acc, new: tuple(a + b for a, b in zip(acc, new)),
                            lambda *dtypes: tuple(tirx.const(0, d) for d in dtypes), name="sum5")

    def sums(*idx):
        positions = [te.reduce_axis((0, extent), name=f"r{k}") for k, extent in enumerate(extents)]
        at = source(idx, positions)
        shifted = x.mean[at] - x.mean[source(idx, [0] * len(extents))]
        var = x.var_at(at) if x.repr != Moment.NONE else f32(0.0)
        return sums5((shifted, shifted * shifted, var, shifted * var, shifted * shifted * var), axis=positions)

    s_sum, s2_sum, v_sum, sv_sum, s2v_sum = te.compute(stats_shape, sums, name=f"{name}_sums")
    n = f32(count)

    def moments(*idx):
        stat = stat_of(idx)
        shift = s_sum[stat] / n
        spread = tirx.max(s2_sum[stat] - s_sum[stat] * shift, f32(0.0)) / n
        inverse_sq = f32(1.0) / (spread + f32(1.0 - 1.0 / count) * v_sum[stat] / n + f32(epsilon))  # 1 / d^2
        inverse = tirx.sqrt(inverse_sq)
        deviation = x.mean[idx] - x.mean[source(stat, [0] * len(extents))] - shift  # c_i
        centered_mean = deviation * inverse
        if x.repr == Moment.NONE:
            centered_var = f32(0.0)
        else:
            var = x.var_at(idx)
            cv_sum = sv_sum[stat] - shift * v_sum[stat]
            c2v_sum = tirx.max(s2v_sum[stat] - f32(2.0) * shift * sv_sum[stat] + shift * shift * v_sum[stat], f32(0.0))
            centered_var = tirx.max(
                inverse_sq * (var * f32(1.0 - 2.0 / count) + v_sum[stat] / f32(count * count))
                - f32(2.0 / count) * deviation * inverse_sq * inverse_sq * (deviation * var - cv_sum / n)
                + deviation * deviation * inverse_sq * inverse_sq * inverse_sq * c2v_sum / f32(count * count), f32(0.0))
        affine = affine_of(idx)
        centered_repr = Moment.NONE if x.repr == Moment.NONE else Moment.VAR
        mean, var = product_moments(centered_mean, centered_var, centered_repr, gamma.mean[affine], gamma.moment_at(affine), gamma.repr)
        return mean + beta.mean[affine], (f32(0.0) if var is None else var) + beta.var_at(affine)

    if all(g.repr == Moment.NONE for g in (x, gamma, beta)):
        return Gaussian(te.compute(x.shape, lambda *idx: moments(*idx)[0], name=f"{name}_mean"), None, Moment.NONE)
    mean, var = te.compute(x.shape, moments, name=name)
    return Gaussian(mean, var, Moment.VAR)


def layer_norm(x: Gaussian, gamma: Gaussian, beta: Gaussian, axes, epsilon: float) -> Gaussian:
    """Y = (X - mean(X)) / sqrt(var(X) + eps) gamma + beta over the trailing ``axes``
    (LayerNormalization), for independent Gaussian x_i (m_i, v_i), i = 1..N of one statistic.
    A stated approximation (exact for a zero variance):

    - the normaliser's square is replaced by its expectation,
          d^2 = E[(1/N) sum_i (x_i - xbar)^2] + eps = (1/N) sum_i c_i^2 + (1 - 1/N) vbar + eps,
      c_i = m_i - mbar, and the mean of u_i = (x_i - xbar) / d by its value at the means: c_i / d;
    - the variance of u_i to first order (delta method) in x around the means, with d at the
      value above: du_i/dx_j = (delta_ij - 1/N) / d - c_i c_j / (N d^3), so
          Var[u_i] = sum_j (du_i/dx_j)^2 v_j
                   = [(1 - 2/N) v_i + sum v / N^2] / d^2 - 2 c_i (c_i v_i - sum_j c_j v_j / N) / (N d^4)
                     + c_i^2 sum_j c_j^2 v_j / (N^2 d^6)
      (the last two terms: the normaliser moves with x_i, which bounds an outlier's output);
    - y = u gamma + beta with independent gamma, beta (``product_moments``).

    Measured against Monte Carlo in tests/test_new_ops.py (docs/supported_operators.md). Native
    output: variance."""
    shape = x.shape
    axes = sorted(axis % len(shape) for axis in axes)
    stats_shape = [1 if axis in axes else shape[axis] for axis in range(len(shape))]
    affine_rank = len(gamma.shape)

    def source(stat, positions):
        chosen = dict(zip(axes, positions))
        return tuple(chosen[axis] if axis in chosen else stat[axis] for axis in range(len(shape)))

    def stat_of(idx):
        return tuple(0 if axis in axes else idx[axis] for axis in range(len(shape)))

    def affine_of(idx):
        return tuple(0 if size == 1 else idx[len(shape) - affine_rank + k] for k, size in enumerate(gamma.shape))

    return _normalize(x, gamma, beta, stats_shape, [shape[axis] for axis in axes], source, stat_of, affine_of, epsilon, "layer_norm")


def group_norm(x: Gaussian, gamma: Gaussian, beta: Gaussian, groups: int, epsilon: float) -> Gaussian:
    """Y = the normalisation of ``layer_norm`` (same stated approximation) over each group of
    C / ``groups`` channels and all positions of an NC... tensor, gamma and beta per channel
    (GroupNormalization; InstanceNormalization is groups = C). Native output: variance."""
    shape = x.shape
    channels = shape[1]
    per_group = channels // groups
    extents = [per_group] + shape[2:]

    def source(stat, positions):
        return (stat[0], stat[1] * per_group + positions[0], *positions[1:])

    def stat_of(idx):
        return (idx[0], idx[1] // per_group)

    def affine_of(idx):
        return (0,) if gamma.shape[0] == 1 else (idx[1],)

    return _normalize(x, gamma, beta, [shape[0], groups], extents, source, stat_of, affine_of, epsilon, "group_norm")


def lrn(a: Gaussian, size: float, alpha: float, beta: float, bias: float) -> Gaussian:
    """Y_c = X_c / B_c^beta, B_c = bias + alpha / size sum_{j in window(c)} x_j^2 over the
    channels c - floor((size - 1)/2) .. c + ceil((size - 1)/2) of an NC... tensor (LRN). A stated
    approximation (exact for a zero variance): B at the expected squares,
    B_c = bias + alpha / size sum_j (m_j^2 + v_j), the mean at the means, m_c / B_c^beta, and the
    variance to first order (delta method) around the means, k = 2 beta (alpha / size) / B^(beta+1):

        Var[y_c] = (B^-beta - k m_c^2)^2 v_c + k^2 m_c^2 sum_{j in window, j != c} m_j^2 v_j

    Measured against Monte Carlo (docs/supported_operators.md). Native output: variance."""
    size = int(size)
    shape = a.shape
    low = (size - 1) // 2

    def window_sums(*idx):
        window = te.reduce_axis((0, size), name="window")
        channel = idx[1] - low + window
        inside = tirx.all(channel >= 0, channel < shape[1])
        at = (idx[0], channel, *idx[2:])
        square = a.mean[at] * a.mean[at]
        var = a.var_at(at) if a.repr != Moment.NONE else f32(0.0)
        return _pair_sum()((tirx.if_then_else(inside, square + var, f32(0.0)), tirx.if_then_else(inside, square * var, f32(0.0))),
                           axis=[window])

    squares, weighted = te.compute(shape, window_sums, name="lrn_sums")

    def moments(*idx):
        base = f32(bias) + f32(alpha / size) * squares[idx]
        inverse = f32(1.0) / tirx.pow(base, f32(beta))  # B^-beta
        mean = a.mean[idx]
        if a.repr == Moment.NONE:
            return mean * inverse, f32(0.0)
        var = a.var_at(idx)
        slope = f32(2.0 * beta * alpha / size) * inverse / base  # k
        own = inverse - slope * mean * mean
        others = tirx.max(weighted[idx] - mean * mean * var, f32(0.0))
        return mean * inverse, own * own * var + slope * slope * mean * mean * others

    if a.repr == Moment.NONE:
        return Gaussian(te.compute(shape, lambda *idx: moments(*idx)[0], name="lrn_mean"), None, Moment.NONE)
    mean, var = te.compute(shape, moments, name="lrn")
    return Gaussian(mean, var, Moment.VAR)


# ---------------------------------------------------------------------------------------------
# 3-D convolution and pooling (NCDHW): the 2-D formulas with one more spatial axis
# ---------------------------------------------------------------------------------------------


def _pool_size(size, kernel, stride, dilation, pad_begin, pad_end, ceil_mode):
    """ONNX's output length of a window along one axis; with ceil_mode a window that would start
    in the end padding is dropped."""
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + pad_begin else out


def _window_source(position, taps, strides, dilations, begins, sizes):
    """(input coordinates, inside) of window element ``taps`` of output ``position``."""
    coords = [p * s + t * d - b for p, t, s, d, b in zip(position, taps, strides, dilations, begins)]
    return coords, tirx.all(*[tirx.all(c >= 0, c < size) for c, size in zip(coords, sizes)])


def conv3d(x: Gaussian, w: Gaussian, strides, pads, dilations, groups) -> Gaussian:
    """Y = conv3d(X, W), NCDHW x OIDHW, zero padding (deterministic zeros), grouped: as
    `gaussian.conv2d` with one more spatial axis, mean sum m_x m_w, variance sum Var(x w)
    (``product_moments``) over the fan-in. Exact. Native output: variance."""
    batch, in_ch, *sizes = x.shape
    out_ch, group_ch, *kernel = w.shape
    begins, ends = pads[:3], pads[3:]
    outs = [_pool_size(size, k, s, d, b, e, False) for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begins, ends)]
    out_per_group = out_ch // groups
    c = te.reduce_axis((0, group_ch), name="c")
    taps = [te.reduce_axis((0, k), name=f"k{axis}") for axis, k in enumerate(kernel)]

    def terms(n, o, *position):
        coords, inside = _window_source(position, taps, strides, dilations, begins, sizes)
        ix, iw = (n, (o // out_per_group) * group_ch + c, *coords), (o, c, *taps)
        x_mean = tirx.if_then_else(inside, x.mean[ix], f32(0.0))
        x_moment = None if x.repr == Moment.NONE else tirx.if_then_else(inside, x.moment[ix], f32(0.0))
        return product_moments(x_mean, x_moment, x.repr, w.mean[iw], w.moment_at(iw), w.repr)

    return _reduce_products([batch, out_ch, *outs], terms, [c, *taps], "conv3d")


def avgpool3d(x: Gaussian, kernel, strides, pads, dilations, ceil_mode=False, count_include_pad=False) -> Gaussian:
    """Y = average of X (NCDHW) over each window of n counted elements: mean sum(m) / n,
    variance sum(v) / n^2 (independent inputs), n as in `gaussian.avgpool2d`. Exact. Native
    output: variance."""
    from .gaussian import _window_count

    batch, chans, *sizes = x.shape
    begins, ends = pads[:3], pads[3:]
    outs = [_pool_size(*args, ceil_mode) for args in zip(sizes, kernel, strides, dilations, begins, ends)]
    taps = [te.reduce_axis((0, k), name=f"k{axis}") for axis, k in enumerate(kernel)]

    def count(n, c, *position):
        total = 1
        for p, k, s, d, b, e, size in zip(position, kernel, strides, dilations, begins, ends, sizes):
            low, high = (-b, size + e) if count_include_pad else (0, size)
            total = total * _window_count(p * s - b, k, d, low, high)
        return total.astype("float32")

    def terms(n, c, *position):
        coords, inside = _window_source(position, taps, strides, dilations, begins, sizes)
        mean = tirx.if_then_else(inside, x.mean[(n, c, *coords)], f32(0.0))
        var = None if x.repr == Moment.NONE else tirx.if_then_else(inside, x.var_at((n, c, *coords)), f32(0.0))
        return mean, var

    total = _reduce_products([batch, chans, *outs], terms, taps, "avgpool3d_sum")
    return _divide_by_count(total, count, "avgpool3d")


def maxpool3d(x: Gaussian, kernel, strides, pads, dilations, ceil_mode=False) -> Gaussian:
    """Y = max over each window of X (NCDHW): Clark's max applied pairwise in row-major window
    order, padded positions skipped (ONNX pads MaxPool with -inf), as `gaussian.maxpool2d`.
    Native output: variance. A deterministic input gives the plain max."""
    batch, chans, *sizes = x.shape
    begins, ends = pads[:3], pads[3:]
    outs = [_pool_size(*args, ceil_mode) for args in zip(sizes, kernel, strides, dilations, begins, ends)]
    out_shape = [batch, chans, *outs]

    def reaches(offset, axis):
        return any(0 <= p * strides[axis] + offset * dilations[axis] - begins[axis] < sizes[axis] for p in range(outs[axis]))

    # window elements that are padding for every output are no step at all
    positions = [p for p in np.ndindex(*kernel) if all(reaches(offset, axis) for axis, offset in enumerate(p))]
    # whether every window element lies inside the input for every output (no padding reached)
    always_inside = all(0 <= t * d - b and (o - 1) * s + t * d - b < size
                        for p in positions for t, s, d, b, o, size in zip(p, strides, dilations, begins, outs, sizes))

    def at(taps, n, c, *position):
        coords, inside = _window_source(position, taps, strides, dilations, begins, sizes)
        if always_inside:
            return inside, x.mean[(n, c, *coords)], f32(0.0) if x.repr == Moment.NONE else x.var_at((n, c, *coords))
        mean = tirx.if_then_else(inside, x.mean[(n, c, *coords)], f32(0.0))
        var = f32(0.0) if x.repr == Moment.NONE else tirx.if_then_else(inside, x.var_at((n, c, *coords)), f32(0.0))
        return inside, mean, var

    if x.repr == Moment.NONE:
        taps = [te.reduce_axis((0, k), name=f"k{axis}") for axis, k in enumerate(kernel)]

        def plain(n, c, *position):
            coords, inside = _window_source(position, taps, strides, dilations, begins, sizes)
            return te.max(tirx.if_then_else(inside, x.mean[(n, c, *coords)], tirx.min_value("float32")), axis=taps)

        return Gaussian(te.compute(out_shape, plain, name="maxpool3d_mean"), None, Moment.NONE)

    def first(*idx):
        _, mean, var = at(positions[0], *idx)
        return mean, var

    def clark_step(k, acc_mean, acc_var):
        """max(accumulated, window element k): its terms (spread, alpha, exponent, phi, Phi) each a
        stage of its own that both moments read, as in `gaussian.maxpool2d` (inlined, the two
        moments would repeat them and TVM's lowering grows with each step)."""

        def stage(name, body):
            return te.compute(out_shape, body, name=f"maxpool3d_{name}_{k}", attrs=SHARED)

        spread = stage("spread", lambda *idx: safe_sqrt(acc_var[idx] + at(positions[k], *idx)[2]))
        alpha = stage("alpha", lambda *idx: safe_ratio(acc_mean[idx] - at(positions[k], *idx)[1], spread[idx]))
        exponent = stage("exponent", lambda *idx: pdf_exponent(alpha[idx]))
        pdf = stage("pdf", lambda *idx: std_normal_pdf(alpha[idx], exponent[idx]))
        cdf = stage("cdf", lambda *idx: std_normal_cdf(alpha[idx], pdf[idx]))
        tail = stage("tail", lambda *idx: clark_tail_ratio(alpha[idx]))

        def step(*idx):
            inside, mean, var = at(positions[k], *idx)
            max_mean, max_var = clark_max_moments(acc_mean[idx], acc_var[idx], mean, var,
                                                  (spread[idx], cdf[idx], pdf[idx], alpha[idx], tail[idx]))
            if always_inside:
                return max_mean, max_var
            seen = tirx.any(*[at(p, *idx)[0] for p in positions[:k]]) if k > 1 else at(positions[0], *idx)[0]

            def pick(acc_value, new_value, max_value):  # padding is skipped; the first valid element is taken as is
                return tirx.Select(tirx.Not(inside), acc_value, tirx.Select(tirx.Not(seen), new_value, max_value))

            return pick(acc_mean[idx], mean, max_mean), pick(acc_var[idx], var, max_var)

        return step

    # each step a stage of its own (`gaussian.SHARED`), as in `reduce_max`
    acc_mean, acc_var = te.compute(out_shape, first, name="maxpool3d_0", attrs=SHARED)
    for k in range(1, len(positions)):
        acc_mean, acc_var = te.compute(out_shape, clark_step(k, acc_mean, acc_var), name=f"maxpool3d_{k}", attrs=SHARED)
    return Gaussian(acc_mean, acc_var, Moment.VAR)
