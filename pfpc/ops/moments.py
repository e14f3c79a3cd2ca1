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
    t = tirx.Var("phi_t", "float32")  # bound once (`_let`): the C reads a local, not the expression five times
    poly = f32(_AS_B[4])
    for coefficient in reversed(_AS_B[:4]):
        poly = poly * t + f32(coefficient)
    lower = tirx.Var("phi_lower", "float32")
    upper_half = tirx.Cast("float32", z >= f32(0.0))  # arithmetic, not a branch: the loop stays vectorisable
    result = lower + upper_half * (f32(1.0) - f32(2.0) * lower)
    return _let(t, f32(1.0) / (f32(1.0) + f32(_AS_P) * tirx.max(z, f32(0.0) - z)),  # |z| (fabs has no C lowering)
                _let(lower, pdf * poly * t, result))


#: The name of an opaque identity (`kept`); `codegen.kernels` takes it out of the printed C.
KEPT = "pfpc_kept"


def kept(value):
    """``value`` behind an opaque call, for a Let's value: TVM's analyzer (every lowering pass that
    tracks Let bindings) binds a pure Let value and substitutes it into the next one's, so a chain
    of Lets that each read earlier ones grew into an expression tree exponential in its depth, and
    a Softplus or GELU kernel took seconds in each of six lowering passes. An opaque value is not
    bound. The call is printed ``pfpc_kept(...)`` and removed from the C (`codegen.kernels`), so
    the C is what it would be without it."""
    return tirx.call_extern("float32", KEPT, value)


def _let(var, value, body):
    """``body`` with ``var`` bound to ``value``: TVM's C backend prints a local (``float phi_t = ...;``)
    where it would repeat ``value`` at every use, on lines of thousands of characters. The same
    operations in the same order: the results are unchanged."""
    return tirx.Let(var, value, body)


def std_normal_pdf(z, exponent=None):
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi) with no libm call, by `exp_nonpositive`; exactly 0 for
    |z| >= 7.75 (z = +-inf included), where phi(z) < 3.8e-14. The formulas built on it then differ
    from exact arithmetic there by less than 1e-15 of the standard deviation (E[max(X, 0)] < 7e-16 s
    for z <= -7.75; Phi(z) rounds to 1 in float32 beyond z = 5.4 anyway). The tiny values
    themselves would turn into subnormal floats downstream (the squares of ReLU means near 1e-20),
    which cost about a hundred cycles each on x86 cores: 40 % of LeNet's PFP time on a digit.
    ``exponent``: `pdf_exponent` of z, when a stage of its own computed it (the exp then reads one
    value where TVM's C printer would repeat the clamp expression at each of its uses)."""
    exponent = pdf_exponent(z) if exponent is None else exponent
    inside = tirx.Cast("float32", exponent > f32(_EXP_MIN))  # 0 or 1: arithmetic, not a branch
    return exp_nonpositive(exponent) * (inside * f32(_INV_SQRT2PI))


def pdf_exponent(z):
    """max(-z^2 / 2, -30): the argument of exp in phi(z), clamped where `std_normal_pdf` is 0."""
    return tirx.max(f32(-0.5) * z * z, f32(_EXP_MIN))


# exp by Cody-Waite reduction and the Cephes expf polynomial (relative error below 1e-7)
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_MIN = -30.0  # phi(z) = 0 for z^2 / 2 >= 30 (`std_normal_pdf`)


def exp_nonpositive(a):
    """exp(a) for -87 <= a <= 0 in arithmetic only, with no libm call, branch or comparison, so
    that a row of them vectorises: a = n ln2 + r with |r| <= ln2 / 2, exp(r) by a polynomial, 2^n
    by writing n + 127 into a float's exponent field (a bit cast: `tirx.reinterpret`, which
    `pfpc.codegen.kernels` has TVM's C backend print as a well-defined ``memcpy``)."""
    n = tirx.Var("exp_n", "int32")
    n_float = tirx.Cast("float32", n)
    r = tirx.Var("exp_r", "float32")
    poly = f32(_EXP_POLY[0])
    for coefficient in _EXP_POLY[1:]:
        poly = poly * r + f32(coefficient)
    power = tirx.reinterpret("float32", tirx.shift_left(n + tirx.const(127, "int32"), tirx.const(23, "int32")))  # -126 <= n <= 0: a normal float
    return _let(n, tirx.Cast("int32", a * f32(_LOG2E) - f32(0.5)),  # round to nearest: truncation of a value <= 0
                _let(r, a - n_float * f32(_LN2_HI) - n_float * f32(_LN2_LO), (poly * r * r + r + f32(1.0)) * power))


def safe_sqrt(var):
    """sqrt(max(V, 0)): variances computed as differences can round slightly below zero."""
    return tirx.sqrt(tirx.max(var, f32(0.0)))


def safe_ratio(num, den):
    """num / den with den clamped to the smallest normal float, so den = 0 gives +-inf or 0."""
    return num / tirx.max(den, f32(_FLT_MIN))


def relu_terms(mean, var):
    """(Phi(z), phi(z), s, z) with s = sqrt(V), z = M / s: the part of `relu_moments` with the
    square root, the divisions and exp, computed once per element and shared by both moments."""
    std = safe_sqrt(var)
    z = safe_ratio(mean, std)
    pdf = std_normal_pdf(z)
    return std_normal_cdf(z, pdf), pdf, std, z


def relu_moments(mean, var, terms=None):
    """Mean and variance of y = max(x, 0) for x ~ N(M, V), with s = sqrt(V), z = M / s:

    E[y]   = M Phi(z) + s phi(z)
    Var[y] = V Phi(z) + M^2 Phi(z) (1 - Phi(z)) + M s phi(z) (1 - 2 Phi(z)) - V phi(z)^2

    The variance is E[y^2] - E[y]^2 = (M^2 + V) Phi + M s phi - (M Phi + s phi)^2 multiplied out
    so that the M^2 terms cancel symbolically, not in float32: for a concentrated input (M = 100,
    V = 1e-4) the difference of the raw moments would round to 0, this form gives V. Its terms
    are each O(V) where Var is (z near 0 or above), so the relative error stays near float32's
    epsilon.

    Deep in the lower tail both moments cancel: E[y] = s (phi(u) - u Q(u)) with u = -z is
    O(s phi(u) / u^2) from terms O(s phi(u)), so Phi's absolute error 7.5e-8 (`std_normal_cdf`)
    came out 3e-3 of the mean at z = -3.5 (the fuzzer's Sum -> Relu -> ReduceMean, seed 200037),
    and the variance's last three terms cancel to O(V phi(u) / u^3). For z <= -1.6, y = s (Z - u)+
    gives both from the tail's partial moments (`normal_tail_moments`, sums of positive terms):

    E[y]   = s psi1(u)
    Var[y] = V (psi2(u) - psi1(u)^2)        (psi1^2 < psi2 / 30 there: no cancellation)

    with psi1 = phi D, psi2 = 2 phi r D, D = 1 / (1 + u (u + 2 r)), from r = B_3 / B_2 of Laplace's
    continued fraction (`relu_tail_ratio`; B_1 = B_2 (u + 2 r), B_0 = B_2 (1 + u (u + 2 r))): the
    polynomials once per element for both moments, and only where z <= -1.6.

    V = 0 gives z = +-inf (or 0 when M = 0), hence exactly (relu(M), 0).
    ``terms``: `relu_terms` (Phi(z), phi(z), s, z) and optionally `relu_tail_ratio` of the same
    element, when the caller computed them once already. Returns (E[y], Var[y]).
    """
    cdf, pdf, std, z, *ratio = terms if terms is not None else relu_terms(mean, var)
    ratio = ratio[0] if ratio else relu_tail_ratio(z)
    std_pdf = std * pdf
    first = mean * cdf + std_pdf
    upper_tail = f32(1.0) - cdf
    variance = var * cdf + mean * mean * cdf * upper_tail + mean * std_pdf * (upper_tail - cdf) - std_pdf * std_pdf
    distance = tirx.min(f32(0.0) - z, f32(_TAIL_TO))  # as `relu_tail_ratio` clamps it (phi = 0 beyond 7.75)
    psi1 = pdf / (f32(1.0) + distance * (distance + f32(2.0) * ratio))
    psi2 = f32(2.0) * ratio * psi1
    tail = z <= f32(-_TAIL_FROM)
    first = tirx.Select(tail, std * psi1, first)
    variance = tirx.Select(tail, var * (psi2 - psi1 * psi1), variance)
    return first, tirx.max(variance, f32(0.0))


def relu_tail_ratio(z):
    """r = B_3(u) / B_2(u), u = -z, of Laplace's continued fraction for the normal tail
    (`normal_tail_moments`, 32 levels; positive polynomials by Horner's rule), where z <= -1.6,
    else 0 (a branch: the polynomials are computed for the lower tail only). `relu_moments`
    forms psi1 and psi2 at u from it."""
    return tirx.Select(z <= f32(-_TAIL_FROM), _tail_ratio(tirx.min(f32(0.0) - z, f32(_TAIL_TO)), _TAIL_LEVELS), f32(0.0))


def _tail_ratio(t, levels):
    """B_3(t) / B_2(t) of Laplace's continued fraction cut after ``levels`` levels (`normal_tail_moments`):
    psi1 = phi / (1 + t (t + 2 r)), Q = (t + 2 r) psi1 and psi2 = 2 r psi1 follow from it."""
    t_squared = tirx.Var("tail_t2", "float32")
    polynomials = _tail_coefficients(levels, 4)
    return _let(t_squared, t * t, _positive_polynomial(polynomials[3], t, t_squared) / _positive_polynomial(polynomials[2], t, t_squared))


def clark_tail_ratio(alpha, distance=None):
    """r = B_3(u) / B_2(u), u = min(|al|, 8), of Laplace's continued fraction (20 levels) where
    Clark's max takes its tail form (|al| >= 2), else 0 (a branch: the polynomials are computed
    for a clear winner only, once for both moments; `clark_max_moments` forms Q, psi1 and psi2
    from it). ``distance``: |al| where the caller computed it (`gaussian.maxpool2d`)."""
    distance = tirx.max(alpha, f32(0.0) - alpha) if distance is None else distance
    return tirx.Select(distance >= f32(_CLARK_TAIL_FROM), _tail_ratio(tirx.min(distance, f32(_TAIL_TO)), _CLARK_TAIL_LEVELS), f32(0.0))


def clark_closed_cdf(alpha, pdf, distance=None):
    """Phi(al) where Clark's max takes its closed form (|al| < 2), else 0 (a branch: the tail
    form reads Q from `clark_tail_ratio`, not Phi, so Phi's division and polynomial are skipped
    for a clear winner; gcc had sunk them into that branch itself for some steps of a window, not
    for others). ``distance``: |al| where the caller computed it (`gaussian.maxpool2d`)."""
    distance = tirx.max(alpha, f32(0.0) - alpha) if distance is None else distance
    return tirx.Select(distance >= f32(_CLARK_TAIL_FROM), f32(0.0), std_normal_cdf(alpha, pdf))


def clip_moments(mean, var, lower, upper):
    """Mean and variance of y = min(max(x, lo), hi) for x ~ N(M, V); ``lower``/``upper`` None =
    unbounded.

    The variance is shift-invariant, so the raw moments are taken of y - c with c = clip(M):
    y - c = clip(x - c, lo - c, hi - c), x - c ~ N(M - c, V). Its mean and second moment are
    O(V) (the clip is 1-Lipschitz), so E[(y-c)^2] - E[y-c]^2 does not cancel the way
    E[y^2] - E[y]^2 does for a concentrated input far from 0. With s = sqrt(V), the shifted mean
    M' = M - c and bounds lo' = lo - c, hi' = hi - c, a = (lo' - M') / s, b = (hi' - M') / s,
    the three pieces of the clipped Gaussian (x < lo, lo <= x <= hi, x > hi) give, using
    int_a^b z phi = phi(a) - phi(b) and int_a^b z^2 phi = Phi(b) - Phi(a) + a phi(a) - b phi(b):

    E[y']   = lo' Phi(a) + hi' Phi(-b) + M' (Phi(b) - Phi(a)) + s (phi(a) - phi(b))
    E[y'^2] = lo'^2 Phi(a) + hi'^2 Phi(-b) + (M'^2 + V) (Phi(b) - Phi(a))
              + s ((M' + lo') phi(a) - (M' + hi') phi(b))

    E[y] = c + E[y'], Var[y] = E[y'^2] - E[y']^2. An absent bound drops its terms (Phi(a) =
    phi(a) = 0, Phi(b) = 1, phi(b) = 0); lo = 0 and no upper bound is ReLU. V = 0 gives a, b =
    +-inf (0 at a bound), hence exactly (clip(M), 0); lo >= hi gives the constant hi.
    Returns (E[y], Var[y]).
    """
    if lower is not None and upper is not None and lower >= upper:
        return f32(upper), f32(0.0)  # min(max(x, lo), hi) = hi for every x: a constant
    std = safe_sqrt(var)
    center = mean if lower is None else tirx.max(mean, f32(lower))
    center = center if upper is None else tirx.min(center, f32(upper))
    shifted = mean - center
    first, second = f32(0.0), f32(0.0)
    first_in, second_in = shifted, shifted * shifted + var  # the M' and M'^2 + V factors of the middle piece
    # P(lo <= x <= hi) = Phi(b) - Phi(a) from the tails that are small (Phi of a negative
    # argument is accurate, 1 - Phi of a positive one is not): for an input far beyond a bound,
    # 1 - Phi(a) - Phi(-b) would lose all of the tiny probability times the large (M'^2 + V)
    inside = f32(1.0)
    zero, tail_from = f32(0.0), f32(_TAIL_FROM)
    tail_a = tail_b = None
    if lower is not None:
        low = f32(lower) - center
        a = safe_ratio(low - shifted, std)
        pdf_a = std_normal_pdf(a)
        tail_a = normal_tail_moments(tirx.max(a, zero - a), pdf_a)  # |a| >= 1.6: Phi(-|a|) and the partial moments
        cdf_a, std_pdf_a = tirx.Select(a <= zero - tail_from, tail_a[0], std_normal_cdf(a, pdf_a)), std * pdf_a
        first = first + low * cdf_a + std_pdf_a
        second = second + low * low * cdf_a + (shifted + low) * std_pdf_a
        inside = tirx.Select(a >= tail_from, tail_a[0], std_normal_cdf(zero - a, pdf_a))
    if upper is not None:
        high = f32(upper) - center
        b = safe_ratio(high - shifted, std)
        pdf_b = std_normal_pdf(b)
        tail_b = normal_tail_moments(tirx.max(b, zero - b), pdf_b)
        upper_tail, std_pdf_b = tirx.Select(b >= tail_from, tail_b[0], std_normal_cdf(zero - b, pdf_b)), std * pdf_b
        first = first + high * upper_tail - std_pdf_b
        second = second + high * high * upper_tail - (shifted + high) * std_pdf_b
        cdf_b = tirx.Select(b <= zero - tail_from, tail_b[0], std_normal_cdf(b, pdf_b))
        if lower is None:
            inside = cdf_b
        else:
            inside = tirx.Select(b <= zero, cdf_b - cdf_a,
                                 tirx.Select(a >= zero, inside - upper_tail, f32(1.0) - cdf_a - upper_tail))
    first = first + first_in * inside
    second = second + second_in * inside
    first, second = _beyond_a_bound(first, second, std, *((a, tail_a) if lower is not None else (None, None)),
                                    *((b, tail_b) if upper is not None else (None, None)))
    if lower is not None and upper is not None:
        first, second = _narrow_window(first, second, shifted, std, low, high, a, b, cdf_a, upper_tail)
    mean_out, var_out = center + first, tirx.max(second - first * first, f32(0.0))
    for tail in (tail_a, tail_b):
        if tail is not None:
            mean_out, var_out = tail[3](mean_out), tail[3](var_out)
    return mean_out, var_out


def _tail_polynomials(levels, count=4):
    """Integer coefficients (index = power of t) of B_0, ..., B_{count-1} of `normal_tail_moments`:
    B_{levels + 1} = 1, B_{levels + 2} = 0, B_n = t B_{n+1} + (n + 1) B_{n+2}."""
    below, current = [0], [1]
    polynomials = {}
    for n in range(levels, -1, -1):
        shifted = [0] + current
        scaled = [(n + 1) * c for c in below] + [0] * (len(shifted) - len(below))
        below, current = current, [x + y for x, y in zip(shifted, scaled)]
        polynomials[n] = current
    return [polynomials[n] for n in range(count)]


#: Laplace's continued fraction cut after 32 levels: relative error below 1.6e-6 from t = 1.6 on
#: (measured in float32 against 40-digit mpmath), 4e-7 from t = 1.7.
_TAIL_LEVELS, _TAIL_FROM, _TAIL_TO = 32, 1.6, 8.0
#: Clark's max switches to its tail form from 2 standard deviations on, with the fraction cut
#: after 20 levels (relative error of psi2 below 7e-6 there against 40-digit mpmath; fewer
#: multiply-adds in every MaxPool step than 32).
_CLARK_TAIL_LEVELS, _CLARK_TAIL_FROM = 20, 2.0
_TAIL_B = {}  # (levels, count) -> `_tail_polynomials`


def _tail_coefficients(levels, count):
    """`_tail_polynomials` (levels, count), computed once."""
    if (levels, count) not in _TAIL_B:
        _TAIL_B[(levels, count)] = _tail_polynomials(levels, count)
    return _TAIL_B[(levels, count)]


def normal_tail_partial_moments(t, pdf, order=4, levels=_TAIL_LEVELS):
    """[psi0(t), ..., psi_order(t)], psi_k(t) = E[(Z - t)+^k] (psi0 = Q), for t >= 1.6 (``pdf`` =
    phi(t)): psi_k = k! phi B_{k+1} / B_0 with Laplace's continued fraction of
    `normal_tail_moments` (cut after ``levels`` levels), B_{order+1} and B_order by Horner's rule
    and the others by the recurrence B_n = t B_{n+1} + (n + 1) B_{n+2}: sums of positive terms,
    nothing cancels. t is clamped to [1, 8]. Returns (moments, bind): expressions in variables
    that ``bind(expr)`` defines around an expression using them (once around the caller's whole
    result, not around each moment: the C would compute the polynomials once per use)."""
    polynomials = _tail_coefficients(levels, order + 2)
    t = tirx.min(tirx.max(t, f32(1.0)), f32(_TAIL_TO))
    t_squared, top, above, inverse = (tirx.Var(f"tail_{name}", "float32") for name in ("t2", f"b{order}", f"b{order + 1}", "inverse"))
    b = {order: top, order + 1: above}
    for n in range(order - 1, 0, -1):
        b[n] = t * b[n + 1] + f32(float(n + 1)) * b[n + 2]
    b0 = t * b[1] + b[2]  # 1 / B_0 >= 1e-31: phi / B_0 would be subnormal from t = 6.5 on
    moments = [pdf * (b[k + 1] * inverse) if k < 2 else f32(float(math.factorial(k))) * pdf * (b[k + 1] * inverse)
               for k in range(order + 1)]

    def bind(value):
        return _let(t_squared, t * t, _let(top, _positive_polynomial(polynomials[order], t, t_squared),
                    _let(above, _positive_polynomial(polynomials[order + 1], t, t_squared), _let(inverse, f32(1.0) / b0, value))))

    return moments, bind


def _positive_polynomial(coefficients, t, t_squared):
    """sum c_k t^k for a polynomial of one parity (every term has the same sign for t > 0), by
    Horner's rule in t^2: no cancellation, a relative error of about the degree times eps."""
    odd = next(k for k, c in enumerate(coefficients) if c) % 2
    result = f32(0.0)
    for c in reversed(coefficients[odd::2]):
        result = result * t_squared + f32(float(c))
    return result * t if odd else result


def normal_tail_moments(t, pdf, levels=_TAIL_LEVELS):
    """The standard normal's upper tail beyond t >= 1.6, ``pdf`` = phi(t): its probability and
    partial moments

    Q(t)    = P(Z > t)      = 1 - Phi(t)
    psi1(t) = E[(Z - t)+]   = phi(t) - t Q(t)
    psi2(t) = E[(Z - t)+^2] = (1 + t^2) Q(t) - t phi(t).

    The two terms of psi1 and psi2 cancel to O(phi(t) / t^2) and O(phi(t) / t^3): with a Q of
    absolute error 7.5e-8 (`std_normal_cdf`) the result is wrong by 100 % at t = 5, and Q itself
    by 1e-3 relative there. Instead, Laplace's continued fraction
    Q(t) / phi(t) = 1/(t + 1/(t + 2/(t + 3/(t + ...)))), its levels written as
    f_n = n/(t + f_{n+1}) = n B_{n+1} / B_n and cut after ``levels`` levels (32: f_33 = 0), gives

    Q = phi B_1 / B_0,  psi1 = phi (1 - t B_1 / B_0) = phi B_2 / B_0,  psi2 = 2 phi B_3 / B_0,

    polynomials in t with non-negative integer coefficients (B_n = t B_{n+1} + (n + 1) B_{n+2}),
    so nothing cancels (`normal_tail_partial_moments` to the second order: B_2 and B_3 by
    Horner's rule, B_1 and B_0 by the recurrence): relative error below 2e-6 from t = 1.6 on,
    4e-7 from t = 1.7 (float32 against 40-digit mpmath). t is clamped to [1, 8] (phi(t) = 0
    beyond 7.75; a caller uses the result for t >= 1.6 only). Returns (Q(t), psi1(t), psi2(t),
    bind), expressions in variables that ``bind(expr)`` defines around an expression using them."""
    moments, bind = normal_tail_partial_moments(t, pdf, 2, levels)
    return (*moments, bind)


def _beyond_a_bound(first, second, std, a, tail_a, b, tail_b):
    """`clip_moments`' raw moments of y' = y - c, recomputed when the mean lies beyond a bound by
    at least 1.6 standard deviations (c = that bound). With u = |M - c| / s the distance to it and
    w = (hi - lo) / s the window's width (w = inf without the other bound), y' = +-s min((Z - u)+, w):

    E[y']   = +-s (psi1(u) - psi1(u + w))
    E[y'^2] = s^2 (psi2(u) - psi2(u + w) - 2 w psi1(u + w))

    from `normal_tail_moments`, where the closed form cancels (its terms are O(M'^2 Q(u)) and
    the result O(V phi(u) / u^3)): N(-78, 210) clipped below at -0.3 had twice its variance.
    The differences here cancel only for a narrow window, which `_narrow_window` integrates.
    ``a``, ``b``: (lo - M) / s and (hi - M) / s, ``tail_a``, ``tail_b``: `normal_tail_moments`
    at |a| and |b|; None for an absent bound."""
    zero = f32(0.0)
    if a is not None and b is not None:
        below = a >= zero - b  # the mean is nearer the lower bound (only one of a, -b can be positive)
        near, far = tirx.Select(below, a, zero - b), tirx.Select(below, b, zero - a)
        near_tail, far_tail = ([tirx.Select(below, x, y) for x, y in zip(tail_a[:3], tail_b[:3])],
                               [tirx.Select(below, y, x) for x, y in zip(tail_a[:3], tail_b[:3])])
        sign = tirx.Select(below, f32(1.0), f32(-1.0))
    elif a is not None:
        near, near_tail, far, sign = a, tail_a, None, f32(1.0)
    else:
        near, near_tail, far, sign = zero - b, tail_b, None, f32(-1.0)
    tail_first, tail_second = near_tail[1], near_tail[2]
    if far is not None:
        width = tirx.min(far, f32(_TAIL_TO)) - tirx.min(near, f32(_TAIL_TO))  # V = 0 makes both inf; phi(far) = 0 beyond 7.75
        tail_first = tail_first - far_tail[1]
        tail_second = tail_second - far_tail[2] - f32(2.0) * width * far_tail[1]
    outside = near >= f32(_TAIL_FROM)
    return (tirx.Select(outside, sign * std * tail_first, first),
            tirx.Select(outside, std * std * tail_second, second))


#: Gauss-Legendre nodes and weights on [0, 1] (5 points: exact for polynomials of degree 9).
_GAUSS_LEGENDRE_01 = tuple(((1.0 + x) / 2.0, w / 2.0) for x, w in (
    (-0.9061798459386640, 0.2369268850561891), (-0.5384693101056831, 0.4786286704993665), (0.0, 0.5688888888888889),
    (0.5384693101056831, 0.4786286704993665), (0.9061798459386640, 0.2369268850561891)))


def _narrow_window(first, second, shifted, std, low, high, a, b, cdf_a, upper_tail):
    """`clip_moments`' raw moments of y' = y - c, with the middle piece integrated numerically
    when the window [lo, hi] lies on one side of the mean and the density changes across it by
    a factor of at most e^3 (|b^2 - a^2| / 2 <= 3):

        E[y'^k] (middle piece) = int_a^b u(z)^k phi(z) dz,  u(z) = M' + s z in [lo', hi'],

    by 5-point Gauss-Legendre (relative error below 1e-6 there). The closed form's terms are
    O(M'^2 P(window)) and cancel to O(width^2 P(window)): for a narrow window far from the mean
    (N(33, 96) clipped to [-0.3, 0.2], 3.4 standard deviations away) float32 kept none of the
    result. Elsewhere the closed form is kept as it is."""
    span = b - a
    middle_first, middle_second = f32(0.0), f32(0.0)
    for node, weight in _GAUSS_LEGENDRE_01:
        u = low + f32(node) * (high - low)
        density = std_normal_pdf(safe_ratio(u - shifted, std)) * f32(weight)
        middle_first = middle_first + u * density
        middle_second = middle_second + u * u * density
    quad_first = low * cdf_a + high * upper_tail + span * middle_first
    quad_second = low * low * cdf_a + high * high * upper_tail + span * middle_second
    change = span * (a + b)
    narrow = tirx.all(tirx.any(b <= f32(0.0), a >= f32(0.0)), change <= f32(6.0), change >= f32(-6.0))
    return tirx.Select(narrow, quad_first, first), tirx.Select(narrow, quad_second, second)


def leaky_relu_moments(mean, var, slope):
    """Mean and variance of y = x for x > 0, slope * x otherwise (LeakyRelu, PRelu), x ~ N(M, V).

    Written from the side of the kink the mean is far from, r = relu(x) for M < 0 and
    r = relu(-x) for M >= 0, both Gaussian relus at -|M| (`relu_moments`: small, from its tail
    form where far), so a saturated input gives E[y] = M or slope M to float32 rounding instead of
    slope M + (1 - slope) M (an output Sub(PRelu(y), y) of y ~ N(50, 6) was -1.9e-6, not 0):

    M <  0:  y = slope x + (1 - slope) relu(x)
    M >= 0:  y = x + (1 - slope) relu(-x)

    so with a = slope or 1, b = (1 - slope) or -(1 - slope), (r1, rv) the moments of r and
    Cov(x, r) = +-V Phi(-|M| / sqrt(V)) (Stein's lemma):

    E[y]   = a M + (1 - slope) r1
    Var[y] = a^2 V + (1 - slope)^2 rv + 2 a b V Phi(-|M| / sqrt(V))

    non-negative terms for 0 <= slope <= 1 (Phi(-|z|) <= 1/2), so no cancellation (see
    `relu_moments`). Exact for every slope; V = 0 gives the deterministic value and 0.
    Returns (E[y], Var[y]).
    """
    negative = mean < f32(0.0)
    toward_kink = tirx.min(mean, f32(0.0) - mean)  # -|M| (tirx.abs prints as an unresolved fabs)
    terms = relu_terms(toward_kink, var)
    relu_first, relu_var = relu_moments(toward_kink, var, terms)
    rest = f32(1.0) - slope
    scale = tirx.Select(negative, slope, f32(1.0))
    cross = tirx.Select(negative, rest, f32(0.0) - rest)
    first = scale * mean + rest * relu_first
    variance = scale * scale * var + rest * rest * relu_var + f32(2.0) * scale * cross * var * terms[0]
    return first, tirx.max(variance, f32(0.0))


def _saturating_variance(slope, var):
    """Var f(x) ~= d (1 - 1/sqrt(1 + 2 d V)) for a sigmoid-shaped f with d = f' at the mean
    written in terms of E[f]: the delta method d^2 V for small V, the variance d of the
    two-valued limit for large V. 1 - 1/sqrt(1 + u) is evaluated as u / (r (1 + r)),
    r = sqrt(1 + u), so a small u loses no precision."""
    spread = f32(2.0) * slope * var
    root = tirx.sqrt(f32(1.0) + spread)
    return slope * spread / (root * (f32(1.0) + root))


def logistic_slope(tail, share=None, scale=None):
    """The logistic function's slope sigmoid'(u) = sigmoid(u) sigmoid(-u) = q / (1 + q)^2 from
    ``tail`` q = e^-|u| (times ``scale``, if given), as ``scale q share^2`` with ``share`` =
    1 / (1 + q) (computed here when not given): 1 - sigmoid(u) in float32 kept nothing of the
    slope in a tail. Tanh's is 4 q / (1 + q)^2 with q = e^-2|u| (scale 4). The moments of
    Sigmoid and Tanh and their covariance loadings (`channel_covariance`) all use it."""
    share = f32(1.0) / (f32(1.0) + tail) if share is None else share
    return (tail if scale is None else f32(scale) * tail) * share * share


def sigmoid_moments(mean, var):
    """Approximate moments of y = sigmoid(x), x ~ N(M, V) (probit approximation,
    sigmoid(x) ~= Phi(x sqrt(pi/8)), whose Gaussian expectation is exact):

    E[y]   ~= sigmoid(M / sqrt(1 + pi V / 8))
    Var[y] ~= E(1 - E) (1 - 1/sqrt(1 + 2 E(1 - E) V))   (see ``_saturating_variance``)

    Against Monte Carlo (tests/test_ops.py; |M| up to ~6, V up to ~5): |mean error| <= 0.005,
    variance error median 8%, at most 12% where Var >= 1e-3. Deep in a saturated tail
    (|M| >> sqrt(V)) the output is log-normal-like and the variance is under-estimated by
    more. V = 0 gives exactly (sigmoid(M), 0). Returns (E[y], Var[y]).
    """
    scaled, tail = tirx.Var("sigmoid_arg", "float32"), tirx.Var("sigmoid_tail", "float32")
    # E (1 - E) = q / (1 + q)^2 with q = e^-|u|: 1 - E in float32 kept nothing of it in a tail
    share = f32(1.0) / (f32(1.0) + tail)
    first = tirx.Select(scaled >= f32(0.0), share, tail * share)
    bind = lambda value: _let(scaled, mean / tirx.sqrt(f32(1.0) + f32(math.pi / 8.0) * var),
                              _let(tail, tirx.exp(f32(0.0) - tirx.max(scaled, f32(0.0) - scaled)), value))
    return bind(first), bind(_saturating_variance(logistic_slope(tail, share), var))


def tanh_moments(mean, var):
    """Approximate moments of y = tanh(x) = 2 sigmoid(2x) - 1, x ~ N(M, V), from the sigmoid
    approximation of 2x ~ N(2M, 4V) (``sigmoid_moments``), simplified:

    E[y]   ~= tanh(M / sqrt(1 + pi V / 2))
    Var[y] ~= (1 - E^2) (1 - 1/sqrt(1 + 2 (1 - E^2) V))

    Against Monte Carlo (tests/test_ops.py): |mean error| <= 0.02, variance error median 7%,
    up to ~70% where Var >= 1e-3 (the saturated tails, as for the sigmoid). V = 0 gives
    exactly (tanh(M), 0). Returns (E[y], Var[y]).
    """
    scaled = mean / tirx.sqrt(f32(1.0) + f32(math.pi / 2.0) * var)
    # 1 - E^2 = 4 q / (1 + q)^2 with q = e^-2|u|: 1 - E^2 in float32 cancelled where E ~ +-1
    # (N(-60, 55): 1 % of the variance, the long run's seed 600028)
    tail = tirx.exp(f32(-2.0) * tirx.max(scaled, f32(0.0) - scaled))
    return tirx.tanh(scaled), _saturating_variance(logistic_slope(tail, scale=4.0), var)


def clark_max_terms(mean1, var1, mean2, var2):
    """(a, Phi(al), phi(al), al) with a = sqrt(V1 + V2), al = (M1 - M2) / a: the part of
    `clark_max_moments` with the square root, the divisions and exp, computed once per pair and
    shared by both moments."""
    spread = safe_sqrt(var1 + var2)
    alpha = safe_ratio(mean1 - mean2, spread)
    pdf = std_normal_pdf(alpha)
    return spread, std_normal_cdf(alpha, pdf), pdf, alpha


def clark_max_moments(mean1, var1, mean2, var2, terms=None, tail_form=True, covariance=None, distance=None):
    """Mean and variance of max(x1, x2) for independent x_i ~ N(M_i, V_i) (Clark 1961), with
    a = sqrt(V1 + V2), d = M1 - M2 and al = d / a:

    E[max]   = M1 Phi(al) + M2 Phi(-al) + a phi(al)
    Var[max] = V1 Phi(al) + V2 Phi(-al) + d^2 Phi(al) Phi(-al) + d a phi(al) (Phi(-al) - Phi(al))
               - a^2 phi(al)^2

    The variance is Clark's E[max^2] - E[max]^2 with both moments taken of max - M2 (the variance
    is shift-invariant), multiplied out: no term of size M^2 is formed, so concentrated inputs
    far from 0 keep their variance (Clark's raw second moment minus the squared mean would
    round it away in float32). Phi(-al) = 1 - Phi(al). a = 0 gives al = +-inf (or 0 when
    M1 = M2), hence the larger mean and 0 exactly.

    When one operand wins by u = |al| >= 2 standard deviations (x_w the winner), the terms above
    are O(d^2 Q(u)) and cancel to O(a^2 phi(u) / u^3): Phi's absolute error 7.5e-8 times d^2 was
    several times a concentrated winner's variance (GlobalMaxPool: 8.96e-8 for 2.54e-8). There
    max = x_w + relu(x_l - x_w) with relu(x_l - x_w) = a (Z - u)+ and, by Stein's lemma,
    Cov(x_w, relu(x_l - x_w)) = -V_w Q(u), so from the tail's probability and partial moments
    (`normal_tail_moments`, 20 levels: relative error below 7e-6 from u = 2 on):

    E[max]   = M_w + a psi1(u)
    Var[max] = V_w (1 - 2 Q(u)) + a^2 (psi2(u) - psi1(u)^2)

    a sum of non-negative terms (psi1^2 < psi2 / 6 there). Below u = 2 the closed form's error
    is at most 5e-5 of the variance. Q, psi1 and psi2 come from one ratio r = B_3 / B_2
    (`clark_tail_ratio`: the polynomials in a branch, only where |al| >= 2). ``terms``:
    `clark_max_terms` (a, Phi(al), phi(al), al) of the same pair, and optionally `clark_tail_ratio`
    of al, when the caller computed them once already. ``tail_form=False``: the closed form
    alone. ``covariance``: c = Cov(x1, x2) of correlated operands (`gaussian.maxpool2d` with
    loadings, where ``terms`` carry a = sqrt(V1 + V2 - 2c)); the closed form holds as it is, and
    the tail's Cov(x_w, relu(x_l - x_w)) is (c - V_w) Q(u), adding 2 c Q(u) to its variance.
    ``distance``: |al| where the caller computed it. Returns (E[max], Var[max]).
    """
    spread, cdf, pdf, alpha, *ratio = terms if terms is not None else clark_max_terms(mean1, var1, mean2, var2)
    cdf_neg = f32(1.0) - cdf
    spread_pdf = spread * pdf
    diff = mean1 - mean2
    first = mean1 * cdf + mean2 * cdf_neg + spread_pdf
    variance = (var1 * cdf + var2 * cdf_neg + diff * diff * cdf * cdf_neg
                + diff * spread_pdf * (cdf_neg - cdf) - spread_pdf * spread_pdf)
    if not tail_form:
        return first, tirx.max(variance, f32(0.0))
    zero = f32(0.0)
    first_wins = alpha >= zero
    distance = tirx.max(alpha, zero - alpha) if distance is None else distance
    ratio = ratio[0] if ratio else clark_tail_ratio(alpha)
    t = tirx.min(distance, f32(_TAIL_TO))  # as `clark_tail_ratio` clamps it (phi = 0 beyond 7.75)
    psi1 = pdf / (f32(1.0) + t * (t + f32(2.0) * ratio))
    tail_probability, psi2 = (t + f32(2.0) * ratio) * psi1, f32(2.0) * ratio * psi1
    winner_mean, winner_var = tirx.Select(first_wins, mean1, mean2), tirx.Select(first_wins, var1, var2)
    tail = distance >= f32(_CLARK_TAIL_FROM)
    first = tirx.Select(tail, winner_mean + spread * psi1, first)
    tail_variance = winner_var * (f32(1.0) - f32(2.0) * tail_probability) + spread * spread * (psi2 - psi1 * psi1)
    if covariance is not None:
        tail_variance = tail_variance + f32(2.0) * covariance * tail_probability
    variance = tirx.Select(tail, tail_variance, variance)
    return first, tirx.max(variance, f32(0.0))


#: Multiply-adds per deterministic MAC in the inner loop of each `product_moments` case, keyed by the
#: operands' representations (the cost model of the footprint report).
FMA_PER_MAC = {("none", "none"): 1, ("none", "var"): 2, ("none", "second_moment"): 2, ("second_moment", "second_moment"): 3}
FMA_PER_MAC_GENERAL = 5


def product_moments(mean_a, moment_a, repr_a, mean_b, moment_b, repr_b, second_of_b=False, second_b=None):
    """Mean and variance of the product of independent Gaussians a and b.

    E[ab] = m_a m_b;  Var(ab) = q_a q_b - m_a^2 m_b^2 = m_a^2 v_b + v_a m_b^2 + v_a v_b,
    where q = m^2 + v. Each operand arrives as its variance ("var"), its second raw moment
    ("second_moment") or as deterministic ("none"); the cheapest exact form is used:

    - none x var:                     m_a^2 v_b                 (first layer: 2 FMA per MAC)
    - second_moment x second_moment:  q_a q_b - (m_a m_b)^2     (hidden layer: 3 FMA per MAC)
    - otherwise the sum of non-negative terms v_b (m_a^2 + v_a) + v_a m_b^2, or with
      ``second_of_b`` v_a (m_b^2 + v_b) + m_a^2 v_b (the same sum): a's second moment is formed
      once per a element and b's square once per b element, or (``second_of_b``) the other way
      round, for a kernel that reads more a elements than b elements per register block (a
      convolution's block of B positions along a row of K taps: B + K - 1 inputs, K weights;
      Cortex-M4: one multiply per input where the second moment took a copy and a multiply-add);
      ``second_b``: b's second moment m_b^2 + v_b read from a tensor (a weight's, folded at
      compile time by `FoldWeightMoments`) instead of formed in the kernel.

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
    # v_b q_a + v_a m_b^2: q_a = m_a^2 + v_a depends on the input element only (computed once per
    # input, not per MAC), and the update acc + v_b q_a + v_a m_b^2 is two fused multiply-adds
    # after one multiply (`codegen.kernels.fused_accumulation`): as cheap as q_a q_b - (m_a m_b)^2
    # and never cancelling
    if second_of_b:
        second_b = mean_b * mean_b + var_b if second_b is None else second_b
        return product, var_a * second_b + (mean_a * mean_a) * var_b
    return product, var_b * (mean_a * mean_a + var_a) + var_a * (mean_b * mean_b)
