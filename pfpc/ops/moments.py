"""Scalar moment formulas as TIR expressions: the building blocks of every Gaussian kernel.

All functions take and return ``tvm.tirx.PrimExpr`` in float32. Divisions are guarded so that
zero variance gives the exact deterministic result and never NaN.
"""

import math

from tvm import tirx

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Smallest normal float32: dividing by it keeps z finite or +-inf, both handled by Phi/exp.
_FLT_MIN = 1.1754943508222875e-38


def f32(value):
    return tirx.const(value, "float32")


# Abramowitz & Stegun 26.2.17 (Hastings): Phi(-|z|) = phi(z) R(t), t = 1 / (1 + p |z|)
_AS_P = 0.2316419
_AS_B = (0.319381530, -0.356563782, 1.781477937, -1.821255978, 1.330274429)


def std_normal_cdf(z, pdf=None):
    """Phi(z) from phi(z) (``pdf``, computed here when not given) with no erf:

    Phi(-|z|) = phi(z) (b1 t + b2 t^2 + ... + b5 t^5),  t = 1 / (1 + 0.2316419 |z|),
    Phi(z) = 1 - Phi(-|z|) for z >= 0  (Abramowitz & Stegun 26.2.17, |error| < 7.5e-8,
    relative error small in the lower tail where 1 + erf would cancel). A kernel that needs phi(z)
    anyway gets Phi for one division and five multiply-adds, all of it vectorisable.
    z = +-inf gives exactly 1 or 0.
    """
    pdf = std_normal_pdf(z) if pdf is None else pdf
    t = f32(1.0) / (f32(1.0) + f32(_AS_P) * tirx.max(z, f32(0.0) - z))  # |z| (fabs has no C lowering)
    poly = f32(_AS_B[4])
    for coefficient in reversed(_AS_B[:4]):
        poly = poly * t + f32(coefficient)
    lower = pdf * poly * t
    return tirx.Select(z >= f32(0.0), f32(1.0) - lower, lower)


def std_normal_pdf(z):
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi); exp(-inf) = 0 for z = +-inf."""
    return tirx.exp(f32(-0.5) * z * z) * f32(_INV_SQRT2PI)


def safe_sqrt(var):
    """sqrt(max(V, 0)): variances computed as differences can round slightly below zero."""
    return tirx.sqrt(tirx.max(var, f32(0.0)))


def safe_ratio(num, den):
    """num / den with den clamped to the smallest normal float, so den = 0 gives +-inf or 0."""
    return num / tirx.max(den, f32(_FLT_MIN))


def relu_terms(mean, var):
    """(z, phi(z)) with z = M / sqrt(V): the part of `relu_moments` that needs exp, computed
    once per element and shared by both moments."""
    z = safe_ratio(mean, safe_sqrt(var))
    return z, std_normal_pdf(z)


def relu_moments(mean, var, terms=None):
    """Moments of y = max(x, 0) for x ~ N(M, V), with s = sqrt(V) and z = M / s:

    E[y]   = M Phi(z) + s phi(z)
    E[y^2] = (M^2 + V) Phi(z) + M s phi(z)

    V = 0 gives z = +-inf (or 0 when M = 0), hence exactly (relu(M), relu(M)^2).
    ``terms``: `relu_terms` of the same element, when the caller computed them once already.
    Returns (E[y], E[y^2]).
    """
    z, pdf = terms if terms is not None else relu_terms(mean, var)
    cdf = std_normal_cdf(z, pdf)
    std_pdf = safe_sqrt(var) * pdf
    first = mean * cdf + std_pdf
    second = (mean * mean + var) * cdf + mean * std_pdf
    return first, second


def clark_max_terms(mean1, var1, mean2, var2):
    """(al, phi(al)) with al = (M1 - M2) / sqrt(V1 + V2): the part of `clark_max_moments` that
    needs exp, computed once per pair and shared by both moments."""
    alpha = safe_ratio(mean1 - mean2, safe_sqrt(var1 + var2))
    return alpha, std_normal_pdf(alpha)


def clark_max_moments(mean1, var1, mean2, var2, terms=None):
    """Moments of max(x1, x2) for independent x_i ~ N(M_i, V_i) (Clark 1961), with
    a = sqrt(V1 + V2) and al = (M1 - M2) / a:

    E[max]   = M1 Phi(al) + M2 Phi(-al) + a phi(al)
    E[max^2] = (V1 + M1^2) Phi(al) + (V2 + M2^2) Phi(-al) + (M1 + M2) a phi(al)

    with Phi(-al) = 1 - Phi(al). a = 0 gives al = +-inf (or 0 when M1 = M2),
    hence the larger mean exactly. ``terms``: `clark_max_terms` of the same pair, when the caller
    computed them once already. Returns (E[max], E[max^2]).
    """
    alpha, pdf = terms if terms is not None else clark_max_terms(mean1, var1, mean2, var2)
    cdf = std_normal_cdf(alpha, pdf)
    cdf_neg = f32(1.0) - cdf
    spread_pdf = safe_sqrt(var1 + var2) * pdf
    first = mean1 * cdf + mean2 * cdf_neg + spread_pdf
    second = (var1 + mean1 * mean1) * cdf + (var2 + mean2 * mean2) * cdf_neg + (mean1 + mean2) * spread_pdf
    return first, second


#: Multiply-adds per deterministic MAC in the inner loop of each `product_moments` case, keyed by the
#: operands' representations (the cost model of the footprint report).
FMA_PER_MAC = {("none", "none"): 1, ("none", "var"): 2, ("none", "second_moment"): 2, ("second_moment", "second_moment"): 3}
FMA_PER_MAC_GENERAL = 5


def product_moments(mean_a, moment_a, repr_a, mean_b, moment_b, repr_b):
    """Mean and variance of the product of independent Gaussians a and b.

    E[ab] = m_a m_b;  Var(ab) = q_a q_b - m_a^2 m_b^2 = m_a^2 v_b + v_a m_b^2 + v_a v_b,
    where q = m^2 + v. Each operand arrives as its variance ("var"), its second raw moment
    ("second_moment") or as deterministic ("none"); the cheapest exact form is used:

    - none x var:                     m_a^2 v_b                 (first layer: 2 FMA per MAC)
    - second_moment x second_moment:  q_a q_b - (m_a m_b)^2     (hidden layer: 3 FMA per MAC)
    - otherwise the sum of non-negative terms m_a^2 v_b + v_a (m_b^2 + v_b).

    Returns (E[ab], Var(ab)) where Var is None when both operands are deterministic.
    """
    product = mean_a * mean_b
    if repr_a == "none" and repr_b == "none":
        return product, None
    if repr_b == "none":  # symmetric case: swap so that a is the deterministic one
        return product_moments(mean_b, moment_b, repr_b, mean_a, moment_a, repr_a)
    if repr_a == "none":
        var_b = moment_b if repr_b == "var" else moment_b - mean_b * mean_b
        return product, mean_a * mean_a * var_b
    if repr_a == "second_moment" and repr_b == "second_moment":
        return product, moment_a * moment_b - product * product
    var_a = moment_a if repr_a == "var" else moment_a - mean_a * mean_a
    var_b = moment_b if repr_b == "var" else moment_b - mean_b * mean_b
    return product, mean_a * mean_a * var_b + var_a * (mean_b * mean_b + var_b)
