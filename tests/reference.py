"""Independent NumPy reference of the probabilistic forward pass (PFP).

Ground truth for pfpc's tests. It deliberately does NOT import pfpc. All math is float64.

Model (docs/math.md): every weight and every activation is an independent Gaussian,
described by a (mean, var) pair of arrays of the same shape. A variance of all zeros means a
deterministic tensor; no function here produces NaN for zero variance.

Contents
  Gaussian ops:   linear, matmul, gemm, conv2d, add, relu, clark_max, maxpool2d,
                  flatten, reshape, subtract, multiply, divide, batch_norm, avgpool2d,
                  reduce_mean, concat, pad, clip, leaky_relu, sigmoid, tanh, reduce_sum,
                  reduce_max, exp, abs_, clark_min, hard_sigmoid, hard_swish, gauss_hermite,
                  slice_, tile, expand, resize, conv_transpose2d, power, layer_norm,
                  group_norm, lrn, conv3d, maxpool3d, avgpool3d
  Interpreter:    pfp_onnx(model, variances, inputs, input_vars=None)
  Ground truth:   monte_carlo(model, stds, inputs, samples, seed, ...)

Where the independence assumption fails, the PFP variance is an approximation even for a
purely linear network (the mean stays exact): e.g. the outputs of one dense layer are
correlated through the shared input, so a THIRD dense layer already sees correlated inputs;
every output pixel of a conv shares the same kernel, so any op after a conv that mixes
positions (a spatial conv, Flatten+Gemm) sees correlated inputs. The PFP variance is exact
(equals Monte Carlo) when each op's inputs really are independent, e.g. Gemm->Gemm with a
deterministic network input, Conv kxk -> Conv 1x1, or Add of two branches with disjoint
weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.special import expit, ndtr
from scipy.stats import truncnorm

__all__ = [
    "linear",
    "matmul",
    "gemm",
    "conv2d",
    "add",
    "relu",
    "clark_max",
    "maxpool2d",
    "flatten",
    "reshape",
    "subtract",
    "multiply",
    "divide",
    "batch_norm",
    "avgpool2d",
    "reduce_mean",
    "concat",
    "pad",
    "clip",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "reduce_sum",
    "reduce_max",
    "exp",
    "abs_",
    "clark_min",
    "hard_sigmoid",
    "hard_swish",
    "gauss_hermite",
    "slice_",
    "tile",
    "expand",
    "resize",
    "conv_transpose2d",
    "power",
    "layer_norm",
    "group_norm",
    "lrn",
    "conv3d",
    "maxpool3d",
    "avgpool3d",
    "SMOOTH_FUNCTIONS",
    "pfp_onnx",
    "monte_carlo",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _var_or_zeros(var, mean: np.ndarray) -> np.ndarray:
    """Variance array for `mean`; None means deterministic (all zeros)."""
    if var is None:
        return np.zeros_like(mean)
    var = _f64(var)
    if var.shape != mean.shape:
        var = np.broadcast_to(var, mean.shape).copy()
    return var


def _pdf(x: np.ndarray) -> np.ndarray:
    """Standard normal density phi(x)."""
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _gaussian_matmul(a_mean, a_var, b_mean, b_var):
    """Product A @ B of two independent Gaussian matrices (numpy.matmul broadcasting).

    Each output element is y = sum_k a_k b_k with independent a_k, b_k, so
        mean = sum m_a m_b                                   = A_m @ B_m
        var  = sum (m_a^2 v_b + v_a m_b^2 + v_a v_b)         = A_m^2 @ B_v + A_v @ B_m^2
                                                               + A_v @ B_v
    (Var(ab) = E[a^2]E[b^2] - m_a^2 m_b^2 = m_a^2 v_b + v_a m_b^2 + v_a v_b.)
    This is the single linear-layer primitive: linear, matmul, gemm and conv2d use it.
    """
    am, bm = _f64(a_mean), _f64(b_mean)
    av, bv = _var_or_zeros(a_var, am), _var_or_zeros(b_var, bm)
    mean = am @ bm
    var = (am * am) @ bv + av @ (bm * bm) + av @ bv
    return mean, var


# --------------------------------------------------------------------------------------
# Gaussian ops
# --------------------------------------------------------------------------------------


def add(a_mean, a_var, b_mean, b_var):
    """Sum of independent Gaussians (numpy broadcasting): mean = m_a + m_b, var = v_a + v_b."""
    am, bm = _f64(a_mean), _f64(b_mean)
    av, bv = _var_or_zeros(a_var, am), _var_or_zeros(b_var, bm)
    return am + bm, av + bv


def matmul(mean, var, w_mean, w_var):
    """ONNX MatMul x @ W with W of shape [in, out]; x may have leading batch dims.

    mean = m @ mu,   var = m^2 @ s2 + v @ mu^2 + v @ s2   (see _gaussian_matmul).
    """
    return _gaussian_matmul(mean, var, w_mean, w_var)


def linear(mean, var, w_mean, w_var, b_mean=None, b_var=None):
    """Dense layer x @ W^T + b with W of shape [out, in] (like Gemm with transB=1).

    mean = m @ mu^T + mu_b
    var  = m^2 @ s2^T + v @ (mu^2)^T + v @ s2^T + s2_b
         = sum over fan-in of (s2*q + mu^2*v) + s2_b, with q = m^2 + v.
    """
    w_mean = _f64(w_mean)
    w_var = _var_or_zeros(w_var, w_mean)
    out_mean, out_var = _gaussian_matmul(mean, var, w_mean.T, w_var.T)
    if b_mean is not None:
        b_mean = _f64(b_mean)
        out_mean, out_var = add(out_mean, out_var, b_mean, _var_or_zeros(b_var, b_mean))
    return out_mean, out_var


def gemm(a_mean, a_var, b_mean, b_var, c_mean=None, c_var=None,
         alpha=1.0, beta=1.0, transA=0, transB=0):
    """ONNX Gemm: Y = alpha * A' @ B' + beta * C, A' = A^T if transA, B' = B^T if transB.

    Any of A, B, C may be Gaussian (independent). Scaling a Gaussian by a constant g maps
    (mean, var) -> (g*mean, g^2*var); C is broadcast unidirectionally to [M, N].
    """
    am, bm = _f64(a_mean), _f64(b_mean)
    av, bv = _var_or_zeros(a_var, am), _var_or_zeros(b_var, bm)
    if transA:
        am, av = am.T, av.T
    if transB:
        bm, bv = bm.T, bv.T
    mean, var = _gaussian_matmul(am, av, bm, bv)
    mean, var = alpha * mean, (alpha * alpha) * var
    if c_mean is not None:
        cm = _f64(c_mean)
        cv = _var_or_zeros(c_var, cm)
        mean, var = add(mean, var, beta * cm, (beta * beta) * cv)
    return mean, var


def _pairs(x, name) -> tuple[int, int]:
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"{name} must have 2 entries for 2-D ops, got {x}")
    return x


def _windows(x: np.ndarray, kernel, strides, dilations, out_hw) -> np.ndarray:
    """Sliding windows of an (already padded) NCHW array.

    Returns shape [N, C, Hout, Wout, kh, kw] with
        out[n, c, i, j, a, b] = x[n, c, i*sh + a*dh, j*sw + b*dw].
    This is the im2col gather; no flipping (ONNX Conv is a cross-correlation).
    """
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    ho, wo = out_hw
    rows = (np.arange(ho) * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (np.arange(wo) * sw)[None, :, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    return x[:, :, rows, cols]


def _pad_hw(x: np.ndarray, top, left, bottom, right, value=0.0) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def conv2d(mean, var, w_mean, w_var, b_mean=None, b_var=None,
           strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1):
    """ONNX Conv, 2-D: x [N, C, H, W], weight [O, C/groups, kh, kw], bias [O].

    pads in ONNX order [top, left, bottom, right]; padding is a deterministic zero
    (m = v = 0). Per output element, over its receptive field (fan-in):
        mean = conv(m, mu) + mu_b
        var  = conv(m^2, s2) + conv(v, mu^2) + conv(v, s2) + s2_b
    implemented as im2col + _gaussian_matmul per group.
    """
    xm = _f64(mean)
    xv = _var_or_zeros(var, xm)
    wm = _f64(w_mean)
    wv = _var_or_zeros(w_var, wm)
    if xm.ndim != 4 or wm.ndim != 4:
        raise ValueError("conv2d expects NCHW input and OIHW weight")
    n, c, h, w = xm.shape
    o, cg, kh, kw = wm.shape
    g = int(groups)
    if c != cg * g or o % g:
        raise ValueError(f"channel mismatch: C={c}, weight {wm.shape}, groups={g}")
    sh, sw = _pairs(strides, "strides")
    dh, dw = _pairs(dilations, "dilations")
    pt, pl, pb, pr = (int(p) for p in pads)
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError("conv2d output would be empty")

    def cols(x):
        win = _windows(_pad_hw(x, pt, pl, pb, pr), (kh, kw), (sh, sw), (dh, dw), (ho, wo))
        # [N, C, Ho, Wo, kh, kw] -> [N, G, C/G * kh * kw, Ho * Wo]
        win = win.reshape(n, g, cg, ho, wo, kh, kw).transpose(0, 1, 2, 5, 6, 3, 4)
        return win.reshape(n, g, cg * kh * kw, ho * wo)

    w_rows_m = wm.reshape(g, o // g, cg * kh * kw)
    w_rows_v = wv.reshape(g, o // g, cg * kh * kw)
    out_m, out_v = _gaussian_matmul(w_rows_m, w_rows_v, cols(xm), cols(xv))  # [N, G, O/G, L]
    out_m = out_m.reshape(n, o, ho, wo)
    out_v = out_v.reshape(n, o, ho, wo)
    if b_mean is not None:
        bm = _f64(b_mean).reshape(1, o, 1, 1)
        bv = _var_or_zeros(b_var, _f64(b_mean)).reshape(1, o, 1, 1)
        out_m, out_v = add(out_m, out_v, bm, bv)
    return out_m, out_v


def clark_max(m1, v1, m2, v2):
    """max(x1, x2) of independent x1 ~ N(m1, v1), x2 ~ N(m2, v2), moment matched (Clark 1961).

    a = sqrt(v1 + v2), al = (m1 - m2) / a:
        E[max]   = m1 Phi(al) + m2 Phi(-al) + a phi(al)
        E[max^2] = (v1 + m1^2) Phi(al) + (v2 + m2^2) Phi(-al) + (m1 + m2) a phi(al)
        var      = E[max^2] - E[max]^2, clipped at 0.
    Two exact moments of the (non-Gaussian) max; the result is re-read as a Gaussian.
    Numerics: the same formulas are evaluated for max - mw, where mw is the larger mean
    (so that mean ~ 0 and E[max^2] - E[max]^2 does not cancel catastrophically). With
    d = |m1 - m2|, vw/vl the variance of the larger/smaller-mean input, al = d / a >= 0:
        E[max - mw]     = -d Phi(-al) + a phi(al)
        E[(max - mw)^2] = vw Phi(al) + (vl + d^2) Phi(-al) - d a phi(al)
    a = 0 (both deterministic) gives exactly (max(m1, m2), 0): no NaN.
    """
    m1, v1, m2, v2 = np.broadcast_arrays(_f64(m1), _f64(v1), _f64(m2), _f64(v2))
    first_wins = m1 >= m2
    mw = np.where(first_wins, m1, m2)
    vw = np.where(first_wins, v1, v2)
    vl = np.where(first_wins, v2, v1)
    d = np.abs(m1 - m2)
    a = np.sqrt(v1 + v2)
    stochastic = a > 0.0
    a_safe = np.where(stochastic, a, 1.0)
    al = np.where(stochastic, np.minimum(d / a_safe, 1e10), 0.0)  # clip: no overflow in al^2
    cdf, cdf_neg, pdf = ndtr(al), ndtr(-al), _pdf(al)
    e1 = -d * cdf_neg + a * pdf
    e2 = vw * cdf + (vl + d * d) * cdf_neg - d * a * pdf
    mean = np.where(stochastic, mw + e1, mw)
    var = np.where(stochastic, np.maximum(e2 - e1 * e1, 0.0), 0.0)
    return mean, var


def clark_max_correlated(m1, v1, a1, m2, v2, a2):
    """max(x1, x2) of x1, x2 with covariance a1 a2 (one shared latent: x_i = m_i + a_i z + e_i),
    Clark (1961): `clark_max`'s formulas with a = sqrt(v1 + v2 - 2 a1 a2), computed as
    sqrt((a1 - a2)^2 + max(v1 - a1^2, 0) + max(v2 - a2^2, 0)); the max's
    loading (its covariance with z) is a1 Phi(al) + a2 Phi(-al), al = (m1 - m2) / a (Stein's
    lemma; the larger mean's input where a = 0). Returns (mean, var, loading)."""
    m1, v1, a1, m2, v2, a2 = np.broadcast_arrays(*(_f64(t) for t in (m1, v1, a1, m2, v2, a2)))
    first_wins = m1 >= m2
    mw, vw, vl = np.where(first_wins, m1, m2), np.where(first_wins, v1, v2), np.where(first_wins, v2, v1)
    d = np.abs(m1 - m2)
    a = np.sqrt((a1 - a2) ** 2 + np.maximum(v1 - a1 * a1, 0.0) + np.maximum(v2 - a2 * a2, 0.0))
    stochastic = a > 0.0
    al = np.where(stochastic, np.minimum(d / np.where(stochastic, a, 1.0), 1e10), np.where(d > 0, 1e10, 0.0))
    cdf, cdf_neg, pdf = ndtr(al), ndtr(-al), _pdf(al)
    e1 = -d * cdf_neg + a * pdf
    e2 = vw * cdf + (vl + d * d) * cdf_neg - d * a * pdf
    mean = mw + e1
    var = np.maximum(e2 - e1 * e1, 0.0)
    loading = np.where(first_wins, a1, a2) * cdf + np.where(first_wins, a2, a1) * cdf_neg
    return mean, var, loading


def relu(mean, var):
    """ReLU of a ~ N(M, V), s = sqrt(V), z = M / s:
        E[y]   = M Phi(z) + s phi(z)
        E[y^2] = (M^2 + V) Phi(z) + M s phi(z)
        var    = E[y^2] - E[y]^2, clipped at 0.
    This is clark_max(M, V, 0, 0) (max with a deterministic zero), which is how it is
    computed; V = 0 gives exactly (relu(M), 0).
    """
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    zeros = np.zeros_like(m)
    return clark_max(m, v, zeros, zeros)


def _pool_out_size(size, k, s, d, p_begin, p_end, ceil_mode) -> int:
    """ONNX pooling output length; with ceil_mode, a window that would start in the end
    padding is dropped (ONNX spec / onnxruntime / PyTorch)."""
    span = size + p_begin + p_end - d * (k - 1) - 1
    if ceil_mode:
        out = -(-span // s) + 1
        if (out - 1) * s >= size + p_begin:
            out -= 1
    else:
        out = span // s + 1
    return out


def _pool_windows(shape, kernel, strides, pads, dilations, ceil_mode):
    """(kernel, output size, windows): windows(x) are the [N, C, Ho, Wo, kh, kw] pooling windows
    of x zero-padded by `pads` and, so that every (possibly ceil-mode) window fits, past the
    end; windows(x, pads_counted=True) takes x as already padded by `pads`."""
    _, _, h, w = shape
    kh, kw = _pairs(kernel, "kernel")
    sh, sw = _pairs(strides, "strides")
    dh, dw = _pairs(dilations, "dilations")
    pt, pl, pb, pr = (int(p) for p in pads)
    ho = _pool_out_size(h, kh, sh, dh, pt, pb, ceil_mode)
    wo = _pool_out_size(w, kw, sw, dw, pl, pr, ceil_mode)
    pb_x = max(pb, (ho - 1) * sh + dh * (kh - 1) + 1 - h - pt)
    pr_x = max(pr, (wo - 1) * sw + dw * (kw - 1) + 1 - w - pl)

    def windows(x, pads_counted=False):
        padded = _pad_hw(x, 0, 0, pb_x - pb, pr_x - pr) if pads_counted else _pad_hw(x, pt, pl, pb_x, pr_x)
        return _windows(padded, (kh, kw), (sh, sw), (dh, dw), (ho, wo))

    return (kh, kw), (ho, wo), windows


def maxpool2d(mean, var, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
              ceil_mode=0):
    """ONNX MaxPool, 2-D, on NCHW Gaussians.

    Each window is reduced with clark_max pairwise in row-major window order:
    acc = x[0]; acc = clark_max(acc, x[1]); acc = clark_max(acc, x[2]); ... and after every
    step acc is the Gaussian (E[max], E[max^2] - E[max]^2). Exact for 2 inputs, an
    approximation (Clark's) for more. Padded positions (and, with ceil_mode, positions
    past the end) are skipped, NOT treated as -inf values. pads = [top, left, bottom, right].
    """
    xm = _f64(mean)
    xv = _var_or_zeros(var, xm)
    if xm.ndim != 4:
        raise ValueError("maxpool2d expects NCHW input")
    (kh, kw), _, windows = _pool_windows(xm.shape, kernel, strides, pads, dilations, ceil_mode)

    def win(x):
        wnd = windows(x)
        return wnd.reshape(wnd.shape[:4] + (kh * kw,))  # row-major window order

    wm, wv = win(xm), win(xv)
    valid = win(np.ones_like(xm)) > 0.5
    if not valid.any(axis=-1).all():
        raise ValueError("maxpool2d: a window lies entirely in the padding")

    acc_m = wm[..., 0].copy()
    acc_v = wv[..., 0].copy()
    have = valid[..., 0].copy()
    for k in range(1, kh * kw):
        ok = valid[..., k]
        cm, cv = clark_max(acc_m, acc_v, wm[..., k], wv[..., k])
        both = have & ok
        first = ~have & ok
        acc_m = np.where(both, cm, np.where(first, wm[..., k], acc_m))
        acc_v = np.where(both, cv, np.where(first, wv[..., k], acc_v))
        have = have | ok
    return acc_m, acc_v


def _maxpool2d_correlated(mean, var, loading, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                          ceil_mode=0):
    """`maxpool2d` of x = m + a z_c + e whose window elements share their channel's latent
    (``loading`` a, docs/covariance.md): each pairwise step is `clark_max_correlated` (covariance
    a1 a2), the accumulated maximum carrying its loading to the next step. Returns (mean, var,
    the maximum's loading)."""
    xm, xa = _f64(mean), _f64(loading)
    xv = _var_or_zeros(var, xm)
    (kh, kw), _, windows = _pool_windows(xm.shape, kernel, strides, pads, dilations, ceil_mode)

    def win(x):
        wnd = windows(x)
        return wnd.reshape(wnd.shape[:4] + (kh * kw,))

    wm, wv, wa = win(xm), win(xv), win(xa)
    valid = win(np.ones_like(xm)) > 0.5
    acc = [wm[..., 0].copy(), wv[..., 0].copy(), wa[..., 0].copy()]
    have = valid[..., 0].copy()
    for k in range(1, kh * kw):
        ok = valid[..., k]
        step = clark_max_correlated(*acc, wm[..., k], wv[..., k], wa[..., k])
        both, first = have & ok, ~have & ok
        acc = [np.where(both, c, np.where(first, w[..., k], old)) for c, w, old in zip(step, (wm, wv, wa), acc)]
        have = have | ok
    return acc[0], acc[1], acc[2]


def maxpool2d_correlated(mean, var, loading, *args, **kwargs):
    """(mean, var) of `_maxpool2d_correlated`."""
    return _maxpool2d_correlated(mean, var, loading, *args, **kwargs)[:2]


def maxpool2d_loading(mean, var, loading, *args, **kwargs):
    """The loading of `_maxpool2d_correlated`'s maxima (a1 Phi(al) + a2 Phi(-al) step by step)."""
    return _maxpool2d_correlated(mean, var, loading, *args, **kwargs)[2]


def flatten(mean, var, axis=1):
    """ONNX Flatten: reshape to [prod(shape[:axis]), prod(shape[axis:])]; mean and var alike."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    axis = axis + m.ndim if axis < 0 else axis
    shape = (int(np.prod(m.shape[:axis], dtype=np.int64)), -1)
    if m.size == 0:
        shape = (shape[0], int(np.prod(m.shape[axis:], dtype=np.int64)))
    return m.reshape(shape), v.reshape(shape)


def reshape(mean, var, shape):
    """Reshape mean and var alike (numpy semantics, -1 allowed)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    shape = tuple(int(s) for s in shape)
    return m.reshape(shape), v.reshape(shape)


def subtract(a_mean, a_var, b_mean, b_var):
    """Difference of independent Gaussians: mean = m_a - m_b, var = v_a + v_b."""
    am, bm = _f64(a_mean), _f64(b_mean)
    return am - bm, _var_or_zeros(a_var, am) + _var_or_zeros(b_var, bm)


def multiply(a_mean, a_var, b_mean, b_var):
    """Element-wise product of independent Gaussians (numpy broadcasting):
    E[ab] = m_a m_b,  Var(ab) = E[a^2] E[b^2] - m_a^2 m_b^2 = m_a^2 v_b + v_a m_b^2 + v_a v_b."""
    am, bm = _f64(a_mean), _f64(b_mean)
    av, bv = _var_or_zeros(a_var, am), _var_or_zeros(b_var, bm)
    return am * bm, am * am * bv + av * bm * bm + av * bv


def divide(a_mean, a_var, c):
    """a / c for a deterministic c: mean = m / c, var = v / c^2."""
    am, c = _f64(a_mean), _f64(c)
    return am / c, _var_or_zeros(a_var, am) / (c * c)


def batch_norm(mean, var, gamma, beta, running_mean, running_var, eps=1e-5, beta_var=None, axis=1):
    """Inference BatchNormalization, an affine map per channel c (along `axis`):
    y = g (x - mu_c) + beta_c with g = gamma / sqrt(running_var + eps):
    mean = g (m - mu_c) + beta_c,  var = g^2 v + var(beta_c)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    shape = [1] * m.ndim
    shape[axis] = -1
    g = (_f64(gamma) / np.sqrt(_f64(running_var) + eps)).reshape(shape)
    bv = np.zeros(shape) if beta_var is None else _f64(beta_var).reshape(shape)
    return g * (m - _f64(running_mean).reshape(shape)) + _f64(beta).reshape(shape), g * g * v + bv


def avgpool2d(mean, var, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
              ceil_mode=0, count_include_pad=0):
    """ONNX AveragePool, 2-D: each window's n counted elements are independent, so
    mean = sum(m) / n,  var = sum(v) / n^2.
    n = window positions inside the input (count_include_pad=0) or inside the padded input
    (count_include_pad=1; positions past the padding, from ceil_mode, never count)."""
    xm = _f64(mean)
    xv = _var_or_zeros(var, xm)
    _, _, h, w = xm.shape
    pt, pl, pb, pr = (int(p) for p in pads)
    _, _, windows = _pool_windows(xm.shape, kernel, strides, pads, dilations, ceil_mode)
    # which positions count: the input, or the input with its declared padding
    counted = np.ones((1, 1, h + pt + pb, w + pl + pr) if count_include_pad else (1, 1, h, w))
    n = windows(counted, pads_counted=bool(count_include_pad)).sum(axis=(-2, -1))
    return windows(xm).sum(axis=(-2, -1)) / n, windows(xv).sum(axis=(-2, -1)) / (n * n)


def reduce_mean(mean, var, axes, keepdims=True):
    """Mean over `axes` of n independent elements: mean = avg(m), var = sum(v) / n^2."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    n = np.prod([m.shape[a] for a in axes])
    return m.mean(axis=tuple(axes), keepdims=keepdims), v.sum(axis=tuple(axes), keepdims=keepdims) / (n * n)


def concat(pairs, axis):
    """Concatenation of (mean, var) pairs: means and variances alike."""
    means = [_f64(m) for m, _ in pairs]
    return (np.concatenate(means, axis=axis),
            np.concatenate([_var_or_zeros(v, m) for (_, v), m in zip(pairs, means)], axis=axis))


def pad(mean, var, before, after, value=0.0, mode="constant"):
    """Constant padding: padded positions are deterministic (mean `value`, var 0). Edge and
    reflect padding copy input elements (NumPy's modes of the same names are ONNX's), so the
    variances are padded the same way."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    widths = list(zip(before, after))
    if mode != "constant":
        return np.pad(m, widths, mode=mode), np.pad(v, widths, mode=mode)
    return np.pad(m, widths, constant_values=value), np.pad(v, widths, constant_values=0.0)


def slice_(mean, var, index):
    """Slice/Split: the elements at the NumPy ``index`` (copies: moments unchanged)."""
    m = _f64(mean)
    return m[index], _var_or_zeros(var, m)[index]


def tile(mean, var, repeats):
    """Tile: copies of the elements (moments repeated)."""
    m = _f64(mean)
    return np.tile(m, repeats), np.tile(_var_or_zeros(var, m), repeats)


def expand(mean, var, shape):
    """Expand: NumPy's two-way broadcast (copies: moments broadcast)."""
    m = _f64(mean)
    out = np.broadcast_shapes(m.shape, tuple(int(d) for d in shape))
    return np.broadcast_to(m, out).copy(), np.broadcast_to(_var_or_zeros(var, m), out).copy()


def conv_transpose2d(mean, var, w_mean, w_var, b_mean=None, b_var=None, strides=(1, 1), pads=(0, 0, 0, 0),
                     dilations=(1, 1), output_padding=(0, 0), groups=1):
    """ConvTranspose, NCHW x [C_in, C_out / groups, kh, kw]: every input element x[n, c, h, w]
    adds x w[c, o, i, j] to output (o, h s - pad_top + i d, w s - pad_left + j d) (scattered, then
    cropped by the pads). Each output is a sum of independent products, so the variances of the
    products (m_x^2 v_w + v_x m_w^2 + v_x v_w) add."""
    m, wm = _f64(mean), _f64(w_mean)
    v, wv = _var_or_zeros(var, m), _var_or_zeros(w_var, wm)
    n, c_in, height, width = m.shape
    _, per_group, kh, kw = wm.shape
    sh, sw = strides
    dh, dw = dilations
    full_h = (height - 1) * sh + dh * (kh - 1) + 1 + output_padding[0]
    full_w = (width - 1) * sw + dw * (kw - 1) + 1 + output_padding[1]
    out_mean = np.zeros((n, per_group * groups, full_h, full_w))
    out_var = np.zeros_like(out_mean)
    in_group = c_in // groups
    for g in range(groups):
        xs, outs = slice(g * in_group, (g + 1) * in_group), slice(g * per_group, (g + 1) * per_group)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + (height - 1) * sh + 1, sh)
                cols = slice(j * dw, j * dw + (width - 1) * sw + 1, sw)
                w_m, w_v = wm[xs, :, i, j], wv[xs, :, i, j]
                out_mean[:, outs, rows, cols] += np.einsum("nchw,co->nohw", m[:, xs], w_m)
                out_var[:, outs, rows, cols] += np.einsum("nchw,co->nohw", m[:, xs] ** 2, w_v) + np.einsum("nchw,co->nohw", v[:, xs], w_m ** 2 + w_v)
    top, left, bottom, right = pads
    crop = (slice(None), slice(None), slice(top, full_h - bottom), slice(left, full_w - right))
    out_mean, out_var = out_mean[crop], out_var[crop]
    if b_mean is not None:
        out_mean = out_mean + _f64(b_mean)[None, :, None, None]
        out_var = out_var + _var_or_zeros(b_var, _f64(b_mean))[None, :, None, None]
    return out_mean, out_var


def power(mean, var, exponent):
    """y = x^p. Integer p >= 0: exact, by probabilists' Gauss-Hermite quadrature with 40 nodes
    (exact for the polynomial x^p and its centred square up to degree 79), the variance as the
    quadrature of (x^p - E[y])^2. Other p >= 0: f(x) = max(x, 0)^p by ``gauss_hermite`` (the
    stated approximation; Monte Carlo measures it)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    if not float(exponent).is_integer():
        return gauss_hermite(lambda x: np.maximum(x, 0.0) ** exponent, m, v)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / math.sqrt(2.0 * math.pi)
    center = m ** int(exponent)  # deviations from M^p: exactly zero for a zero variance
    deviation = (m[..., None] + np.sqrt(v)[..., None] * nodes) ** int(exponent) - center[..., None]
    shift = (deviation * weights).sum(-1)
    return center + shift, ((deviation - shift[..., None]) ** 2 * weights).sum(-1)


def layer_norm(mean, var, gamma_mean, gamma_var, beta_mean, beta_var, axes, epsilon):
    """LayerNormalization over ``axes`` of independent Gaussian inputs by pfpc's stated
    approximation: the normaliser's square at its expectation,

        E[(1/N) sum (x_i - xbar)^2] = (1/N) sum E[x_i^2] - E[xbar^2] = (1/N) sum (m_i^2 + v_i) - (mbar^2 + sum v / N^2),

    the mean of u = (x - xbar) / d at the means, its variance to first order: the Jacobian
    J = (I - 1/N) / d - c c^T / (N d^3) (c = m - mbar) built explicitly, Var[u] = (J o J) v;
    then y = u gamma + beta with independent gamma, beta."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    axes = tuple(a % m.ndim for a in axes)
    rest = tuple(a for a in range(m.ndim) if a not in axes)
    order = rest + axes
    count = int(np.prod([m.shape[a] for a in axes]))
    flat_m = np.transpose(m, order).reshape(-1, count)
    flat_v = np.transpose(v, order).reshape(-1, count)
    u_mean, u_var = np.empty_like(flat_m), np.empty_like(flat_m)
    for row, (mr, vr) in enumerate(zip(flat_m, flat_v)):
        expected = (mr ** 2 + vr).mean() - (mr.mean() ** 2 + vr.sum() / count ** 2)
        d = math.sqrt(expected + epsilon)
        c = mr - mr.mean()
        jacobian = (np.eye(count) - 1.0 / count) / d - np.outer(c, c) / (count * d ** 3)
        u_mean[row], u_var[row] = c / d, (jacobian ** 2) @ vr
    shape = tuple(m.shape[a] for a in order)
    inverse = np.argsort(order)
    u_mean = np.transpose(u_mean.reshape(shape), inverse)
    u_var = np.transpose(u_var.reshape(shape), inverse)
    g_m, g_v = _f64(gamma_mean), _var_or_zeros(gamma_var, _f64(gamma_mean))
    b_m, b_v = _f64(beta_mean), _var_or_zeros(beta_var, _f64(beta_mean))
    return u_mean * g_m + b_m, u_mean ** 2 * g_v + u_var * (g_m ** 2 + g_v) + b_v


def group_norm(mean, var, gamma_mean, gamma_var, beta_mean, beta_var, groups, epsilon):
    """GroupNormalization (InstanceNormalization: groups = channels) of NC...: ``layer_norm``
    over each group of channels and all positions, gamma and beta per channel."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    n, channels = m.shape[:2]
    grouped = (n, groups, channels // groups) + m.shape[2:]
    ones = np.ones(grouped[1:])
    y_m, y_v = layer_norm(m.reshape(grouped), v.reshape(grouped), ones, None, 0.0 * ones, None, tuple(range(2, len(grouped))), epsilon)
    along = (1, channels) + (1,) * (m.ndim - 2)
    g_m, g_v = _f64(gamma_mean).reshape(along), _var_or_zeros(gamma_var, _f64(gamma_mean)).reshape(along)
    b_m, b_v = _f64(beta_mean).reshape(along), _var_or_zeros(beta_var, _f64(beta_mean)).reshape(along)
    y_m, y_v = y_m.reshape(m.shape), y_v.reshape(m.shape)
    return y_m * g_m + b_m, y_m ** 2 * g_v + y_v * (g_m ** 2 + g_v) + b_v


def lrn(mean, var, size, alpha, beta, bias):
    """LRN by pfpc's stated approximation: B_c = bias + alpha / size sum_{j in window(c)} (m_j^2 + v_j),
    mean m_c B_c^-beta, variance to first order sum_j (dy_c/dx_j)^2 v_j with the derivatives of
    y_c = x_c (bias + alpha / size sum_j x_j^2)^-beta at the means, B in place of the bracket:
    dy_c/dx_j = delta_cj B^-beta - 2 beta (alpha / size) m_c m_j B^(-beta-1)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    channels = m.shape[1]
    low = (size - 1) // 2
    base = np.zeros_like(m)
    for c in range(channels):
        window = range(max(0, c - low), min(channels, c - low + size))
        base[:, c] = bias + alpha / size * sum(m[:, j] ** 2 + v[:, j] for j in window)
    out_var = np.zeros_like(m)
    for c in range(channels):
        for j in range(max(0, c - low), min(channels, c - low + size)):
            derivative = (base[:, c] ** -beta if j == c else 0.0) - 2 * beta * alpha / size * m[:, c] * m[:, j] * base[:, c] ** (-beta - 1)
            out_var[:, c] += derivative ** 2 * v[:, j]
    return m * base ** -beta, out_var


def _taps_nd(x, kernel, strides, dilations, begins, outs, fill):
    """{window element (row-major): x's [N, C, *outs] values at it} for x padded by ``begins``
    before and with ``fill`` as far past the end as the windows reach."""
    ends = [max(0, (o - 1) * s + d * (k - 1) + 1 - size - b) for o, s, d, k, size, b in zip(outs, strides, dilations, kernel, x.shape[2:], begins)]
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begins, ends)), constant_values=fill)
    return {taps: padded[(slice(None), slice(None)) + tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                                                            for t, d, o, s in zip(taps, dilations, outs, strides))]
            for taps in np.ndindex(*kernel)}


def conv3d(mean, var, w_mean, w_var, b_mean=None, b_var=None, strides=(1, 1, 1), pads=(0,) * 6, dilations=(1, 1, 1), groups=1):
    """Conv, 3-D (NCDHW x OIDHW, pads [begin..., end...]): for every kernel element the shifted
    input times the weight, summed; products of independent Gaussians add their variances
    m_x^2 v_w + v_x (m_w^2 + v_w)."""
    m, wm = _f64(mean), _f64(w_mean)
    v, wv = _var_or_zeros(var, m), _var_or_zeros(w_var, wm)
    out_ch, group_ch = wm.shape[:2]
    kernel = wm.shape[2:]
    outs = [_pool_out_size(size, k, s, d, b, e, 0) for size, k, s, d, b, e in zip(m.shape[2:], kernel, strides, dilations, pads[:3], pads[3:])]
    taps_m = _taps_nd(m, kernel, strides, dilations, pads[:3], outs, 0.0)
    taps_v = _taps_nd(v, kernel, strides, dilations, pads[:3], outs, 0.0)
    out_mean = np.zeros((m.shape[0], out_ch, *outs))
    out_var = np.zeros_like(out_mean)
    per_group = out_ch // groups
    for taps in np.ndindex(*kernel):
        for g in range(groups):
            xs, os_ = slice(g * group_ch, (g + 1) * group_ch), slice(g * per_group, (g + 1) * per_group)
            w_m, w_v = wm[(os_, slice(None)) + taps], wv[(os_, slice(None)) + taps]
            out_mean[:, os_] += np.einsum("ncdhw,oc->nodhw", taps_m[taps][:, xs], w_m)
            out_var[:, os_] += (np.einsum("ncdhw,oc->nodhw", taps_m[taps][:, xs] ** 2, w_v)
                                + np.einsum("ncdhw,oc->nodhw", taps_v[taps][:, xs], w_m ** 2 + w_v))
    if b_mean is not None:
        out_mean = out_mean + _f64(b_mean).reshape(1, -1, 1, 1, 1)
        out_var = out_var + _var_or_zeros(b_var, _f64(b_mean)).reshape(1, -1, 1, 1, 1)
    return out_mean, out_var


def _pool3d_geometry(shape, kernel, strides, pads, dilations, ceil_mode):
    return [_pool_out_size(size, k, s, d, b, e, ceil_mode)
            for size, k, s, d, b, e in zip(shape[2:], kernel, strides, dilations, pads[:3], pads[3:])]


def maxpool3d(mean, var, kernel, strides=(1, 1, 1), pads=(0,) * 6, dilations=(1, 1, 1), ceil_mode=0):
    """MaxPool, 3-D: clark_max pairwise in row-major window order, padded positions skipped."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    outs = _pool3d_geometry(m.shape, kernel, strides, pads, dilations, ceil_mode)
    taps_m = _taps_nd(m, kernel, strides, dilations, pads[:3], outs, 0.0)
    taps_v = _taps_nd(v, kernel, strides, dilations, pads[:3], outs, 0.0)
    taps_in = _taps_nd(np.ones_like(m), kernel, strides, dilations, pads[:3], outs, 0.0)
    acc_m = acc_v = have = None
    for taps in np.ndindex(*kernel):
        inside = taps_in[taps] > 0.5
        if acc_m is None:
            acc_m, acc_v, have = taps_m[taps].copy(), taps_v[taps].copy(), inside.copy()
            continue
        max_m, max_v = clark_max(acc_m, acc_v, taps_m[taps], taps_v[taps])
        acc_m = np.where(inside, np.where(have, max_m, taps_m[taps]), acc_m)
        acc_v = np.where(inside, np.where(have, max_v, taps_v[taps]), acc_v)
        have |= inside
    return acc_m, acc_v


def avgpool3d(mean, var, kernel, strides=(1, 1, 1), pads=(0,) * 6, dilations=(1, 1, 1), ceil_mode=0, count_include_pad=0):
    """AveragePool, 3-D: mean = sum(m) / n, var = sum(v) / n^2 over the n counted positions
    (inside the input, or with count_include_pad inside the padded input)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    outs = _pool3d_geometry(m.shape, kernel, strides, pads, dilations, ceil_mode)
    taps_m = _taps_nd(m, kernel, strides, dilations, pads[:3], outs, 0.0)
    taps_v = _taps_nd(v, kernel, strides, dilations, pads[:3], outs, 0.0)
    counted = np.ones_like(m)
    if count_include_pad:  # the padded input counts, positions past its end (ceil_mode) do not
        counted = np.pad(counted, [(0, 0), (0, 0)] + list(zip(pads[:3], pads[3:])), constant_values=1.0)
    taps_n = _taps_nd(counted, kernel, strides, dilations, (0, 0, 0) if count_include_pad else pads[:3], outs, 0.0)
    n = sum(taps_n.values())
    return sum(taps_m.values()) / n, sum(taps_v.values()) / n ** 2


def _resize_matrix(in_size, out_size, method, mode, nearest_mode):
    """[out, in] interpolation weights of ONNX Resize along one axis (scale = out / in)."""
    scale = out_size / in_size
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        if mode == "half_pixel" or (mode == "pytorch_half_pixel" and out_size > 1):
            x = (i + 0.5) / scale - 0.5
        elif mode == "pytorch_half_pixel":
            x = 0.0
        elif mode == "asymmetric":
            x = i / scale
        elif mode == "align_corners":
            x = 0.0 if out_size == 1 else i * (in_size - 1) / (out_size - 1)
        else:
            raise NotImplementedError(f"Resize coordinate_transformation_mode {mode}")
        if method == "nearest":
            fraction = x - math.floor(x)
            if nearest_mode == "floor":
                j = math.floor(x)
            elif nearest_mode == "ceil":
                j = math.ceil(x)
            elif nearest_mode == "round_prefer_ceil":
                j = math.floor(x) + (fraction >= 0.5)
            else:  # round_prefer_floor
                j = math.floor(x) + (fraction > 0.5)
            matrix[i, min(max(j, 0), in_size - 1)] = 1.0
        else:
            x = min(max(x, 0.0), in_size - 1.0)
            low = int(math.floor(x))
            high = min(low + 1, in_size - 1)
            matrix[i, low] += 1.0 - (x - low)
            matrix[i, high] += x - low
    return matrix


def resize(mean, var, out_hw, method, mode="half_pixel", nearest_mode="round_prefer_floor"):
    """Resize of NCHW over H and W: Y = A_h X A_w^T with the interpolation matrices A; for
    independent inputs mean = A_h m A_w^T and var = (A_h o A_h) v (A_w o A_w)^T (o: element-wise
    square, each output a weighted sum of independent inputs)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    rows = _resize_matrix(m.shape[2], out_hw[0], method, mode, nearest_mode)
    cols = _resize_matrix(m.shape[3], out_hw[1], method, mode, nearest_mode)
    return (np.einsum("yh,nchw,xw->ncyx", rows, m, cols),
            np.einsum("yh,nchw,xw->ncyx", rows ** 2, v, cols ** 2))


def clip(mean, var, lower=None, upper=None):
    """y = min(max(x, lower), upper) for x ~ N(M, V), as a mixture of three pieces: the mass
    below `lower` (y = lower), above `upper` (y = upper), and the truncated normal between
    (its mean and variance from scipy.stats.truncnorm), with deviations from c = clip(M):
        E[y] - c = (lo - c) P_lo + (hi - c) P_hi + P_mid (E_mid - c)
        Var[y]   = P_lo (lo - E[y])^2 + P_hi (hi - E[y])^2 + P_mid (Var_mid + (E_mid - E[y])^2)
    V = 0 gives exactly (clip(M), 0)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    lo = -np.inf if lower is None else float(lower)
    hi = np.inf if upper is None else float(upper)
    s = np.sqrt(v)
    stochastic = s > 0
    s_safe = np.where(stochastic, s, 1.0)
    a, b = (lo - m) / s_safe, (hi - m) / s_safe
    p_lo, p_hi = ndtr(a), ndtr(-b)
    # P(lo <= x <= hi) from the small tails when the mean lies beyond a bound (1 - P_lo - P_hi keeps
    # no digit of a probability of 1e-14)
    p_mid = np.maximum(np.where(a > 0, ndtr(-a) - ndtr(-b), np.where(b < 0, ndtr(b) - ndtr(a), 1.0 - p_lo - p_hi)), 0.0)
    a_t, b_t = np.minimum(a, 30.0), np.maximum(b, -30.0)  # truncnorm needs a < b; such P_mid is 0
    ok = (p_mid > 0) & (a_t < b_t)
    mid_mean_z, mid_var_z = truncnorm.stats(np.where(ok, a_t, -1.0), np.where(ok, b_t, 1.0), moments="mv")
    mid_var = v * np.where(ok, mid_var_z, 0.0)
    # deviations from c = clip(M) and the law of total variance, a sum of non-negative terms: the
    # raw E[y^2] - E[y]^2 cancels in float64 too when the mean lies far beyond a bound (N(50, 9)
    # clipped to [-1, 5] lost 13 % of a variance of 1e-13)
    exact = np.clip(m, lo, hi)
    lo_dev = np.where(p_lo > 0, lo - exact, 0.0)
    hi_dev = np.where(p_hi > 0, hi - exact, 0.0)
    mid_dev = (m - exact) + s * np.where(ok, mid_mean_z, 0.0)
    shift = lo_dev * p_lo + hi_dev * p_hi + p_mid * mid_dev  # E[y] - c
    variance = (p_lo * (lo_dev - shift) ** 2 + p_hi * (hi_dev - shift) ** 2
                + p_mid * (mid_var + (mid_dev - shift) ** 2))
    return np.where(stochastic, exact + shift, exact), np.where(stochastic, variance, 0.0)


def leaky_relu(mean, var, slope):
    """y = x for x > 0, slope x otherwise (LeakyRelu, PRelu with a deterministic slope), written
    as y = relu(x) - slope relu(-x); the two parts are never both non-zero, so
        E[y]   = E[relu(x)] - slope E[relu(-x)]
        E[y^2] = E[relu(x)^2] + slope^2 E[relu(-x)^2]."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    slope = _f64(slope)
    pos_mean, pos_var = relu(m, v)
    neg_mean, neg_var = relu(-m, v)
    e1 = pos_mean - slope * neg_mean
    e2 = pos_var + pos_mean ** 2 + slope * slope * (neg_var + neg_mean ** 2)
    return e1, np.where(v > 0, np.maximum(e2 - e1 * e1, 0.0), 0.0)


def _saturating_var(derivative, v):
    """d (1 - 1/sqrt(1 + 2 d v)): the delta method d^2 v for small v, d for large v; with
    u = 2 d v and r = sqrt(1 + u), 1 - 1/r = u / (r (1 + r)) (1 - 1/r cancelled below u ~ 1e-16)."""
    spread = 2.0 * derivative * v
    root = np.sqrt(1.0 + spread)
    return derivative * spread / (root * (1.0 + root))


def sigmoid(mean, var):
    """Probit approximation (docs/math.md): E ~= sigmoid(M / sqrt(1 + pi V / 8)), and
    Var ~= E (1 - E) (1 - 1 / sqrt(1 + 2 E (1 - E) V)). An approximation: the tests measure
    its error against Monte Carlo."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    scaled = m / np.sqrt(1.0 + np.pi * v / 8.0)
    # E (1 - E) as sigmoid(u) sigmoid(-u): 1 - E cancels in float64 too beyond u ~ 37
    return expit(scaled), _saturating_var(expit(scaled) * expit(-scaled), v)


def tanh(mean, var):
    """tanh(x) = 2 sigmoid(2x) - 1 with the sigmoid approximation for 2x ~ N(2M, 4V):
    E ~= tanh(M / sqrt(1 + pi V / 2)), Var ~= (1 - E^2) (1 - 1 / sqrt(1 + 2 (1 - E^2) V))."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    e_sig, var_sig = sigmoid(2.0 * m, 4.0 * v)
    return 2.0 * e_sig - 1.0, 4.0 * var_sig


def reduce_sum(mean, var, axes, keepdims=True):
    """Sum over `axes` of independent elements: means and variances add."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    return m.sum(axis=tuple(axes), keepdims=keepdims), v.sum(axis=tuple(axes), keepdims=keepdims)


def reduce_max(mean, var, axes, keepdims=True):
    """Max over `axes`: `clark_max` folded over the reduced positions in row-major order, each
    intermediate max re-read as a Gaussian."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    axes = sorted(a % m.ndim for a in axes)
    kept = [a for a in range(m.ndim) if a not in axes]
    m2 = np.transpose(m, kept + axes).reshape([m.shape[a] for a in kept] + [-1])
    v2 = np.transpose(v, kept + axes).reshape(m2.shape)
    acc_m, acc_v = m2[..., 0], v2[..., 0]
    for k in range(1, m2.shape[-1]):
        acc_m, acc_v = clark_max(acc_m, acc_v, m2[..., k], v2[..., k])
    shape = [1 if a in axes else m.shape[a] for a in range(m.ndim)] if keepdims else [m.shape[a] for a in kept]
    return acc_m.reshape(shape), acc_v.reshape(shape)


def clark_min(m1, v1, m2, v2):
    """min(x1, x2) = -max(-x1, -x2) (`clark_max`)."""
    mean, var = clark_max(-_f64(m1), v1, -_f64(m2), v2)
    return -mean, var


def exp(mean, var):
    """Log-normal: E = exp(m + v/2), Var = exp(2m + v) (exp(v) - 1)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    return np.exp(m + v / 2), np.exp(2 * m + v) * np.expm1(v)


def abs_(mean, var):
    """Folded normal: E|x| = s sqrt(2/pi) exp(-m^2 / 2v) + m (1 - 2 Phi(-m/s)), E[x^2] = m^2 + v."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    s = np.sqrt(v)
    safe = np.where(s > 0, s, 1.0)
    first = np.where(s > 0, s * np.sqrt(2 / np.pi) * np.exp(-m * m / (2 * np.where(v > 0, v, 1.0))) + m * (1 - 2 * ndtr(-m / safe)), np.abs(m))
    return first, np.maximum(m * m + v - first * first, 0.0)


def hard_sigmoid(mean, var, alpha, beta):
    """clip(alpha x + beta, 0, 1): the clipped Gaussian of the affine map (`clip`)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    return clip(alpha * m + beta, alpha * alpha * v, 0.0, 1.0)


def _integrate(function, m, v, points=4001, width=12.0):
    """E[f(x)] and Var[f(x)] for x ~ N(m, v) element-wise by the trapezoid rule on m +- width s
    (v = 0: f(m), 0). Independent of any closed form; accurate to ~1e-9 for the piecewise-smooth f
    here. The moments are of f(x) - f(m): E[f^2] - E[f]^2 cancelled in float64 too (N(54, 6.5e-9)
    through HardSwish: 6.399e-9 for 6.509e-9, the long run's seed 700039)."""
    s = np.sqrt(v)
    z = np.linspace(-width, width, points)
    weights = np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    weights[[0, -1]] *= 0.5
    weights *= z[1] - z[0]
    center = function(m)
    deltas = function(m[..., None] + s[..., None] * z) - center[..., None]
    shift = deltas @ weights
    return center + shift, np.maximum((deltas * deltas) @ weights - shift * shift, 0.0)


def hard_swish(mean, var, alpha=1 / 6, beta=0.5):
    """x clip(alpha x + beta, 0, 1): exact moments, here by numerical integration (`_integrate`)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)

    def function(x):
        return x * np.clip(alpha * x + beta, 0.0, 1.0)

    first, variance = _integrate(function, m, v)
    return np.where(v > 0, first, function(m)), np.where(v > 0, variance, 0.0)


def _elu(alpha, gamma=1.0):
    return lambda x: gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


#: The smooth activations pfpc computes by Gauss-Hermite quadrature (ONNX op -> attrs -> f).
SMOOTH_FUNCTIONS = {
    "silu": lambda a: (lambda x: x * expit(x)),
    # x Phi(x) with ndtr: 1 + erf(x / sqrt 2) cancels in float64 too below x ~ -6
    "gelu": lambda a: (lambda x: x * ndtr(x)) if a.get("approximate", "none") in ("none", b"none")
    # 0.5 x (1 + tanh(u)) = x sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3): expit keeps the lower tail
    else (lambda x: x * expit(2.0 * np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3))),
    "softplus": lambda a: (lambda x: np.logaddexp(0.0, x)),
    "elu": lambda a: _elu(a.get("alpha", 1.0)),
    "selu": lambda a: _elu(a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)),
}


def gauss_hermite(function, mean, var, points=16):
    """The approximation pfpc uses for smooth activations: Gauss-Hermite quadrature with `points`
    nodes, E = sum w f(m + sqrt(2v) t) / sqrt(pi), Var = sum w f^2 / sqrt(pi) - E^2."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    nodes, weights = np.polynomial.hermite.hermgauss(points)
    center = function(m)
    deltas = function(m[..., None] + np.sqrt(2 * v)[..., None] * nodes) - center[..., None]  # 0 where v = 0
    shift = deltas @ weights / np.sqrt(np.pi)
    return center + shift, np.maximum((deltas * deltas) @ weights / np.sqrt(np.pi) - shift * shift, 0.0)


# --------------------------------------------------------------------------------------
# ONNX interpreter
# --------------------------------------------------------------------------------------



# --- the per-channel shared-noise PFP's operators (pfpc/ops/channel_covariance.py; the whole
# propagation's float64 reference is tests/reference_covariance.py) ---------------------------
def conv2d_split(mean, var, w_mean, w_var, independent, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1):
    """Conv whose input x = m + a z + e has independent variance e = v - a^2:
    mean conv(m, mu), var conv(m^2 + v, s2) + conv(e, mu^2) (the coherent part left out)."""
    m = _f64(mean)
    v = _var_or_zeros(var, m)
    geometry = dict(strides=strides, pads=pads, dilations=dilations, groups=groups)
    wm = _f64(w_mean)
    noise = conv2d(m * m + v, None, _var_or_zeros(w_var, wm), None, **geometry)[0]
    indep = conv2d(_f64(independent), None, wm * wm, None, **geometry)[0]
    return conv2d(m, None, wm, None, **geometry)[0], noise + indep


def add_variance(mean, var, extra, square=False):
    """(m, v) -> (m, v + c), or v + c^2 with ``square``."""
    c = _f64(extra)
    return _f64(mean), _f64(var) + (c * c if square else c)


def pooled_variance(mean, var, independent_mean, loading, count):
    """(avg m, avg(v - a^2) / P + avg(a)^2) from the pooled moments and the averages."""
    return _f64(mean), _f64(independent_mean) / count + _f64(loading) ** 2


def independent_variance(mean, var, loading):
    """max(v - a^2, 0)."""
    return np.maximum(_f64(var) - _f64(loading) ** 2, 0.0)


def raw_second_moment(mean, var):
    """m^2 + v."""
    return _f64(mean) ** 2 + _f64(var)


def relu_loading(mean, var, loading):
    """a Phi(m / s) (not clamped: within the ReLU output's std for |a| <= s)."""
    m, v = _f64(mean), _f64(var)
    s = np.sqrt(v)
    slope = np.where(s > 0, ndtr(m / np.where(s > 0, s, 1.0)), (m > 0).astype(float))
    return _f64(loading) * slope


def clip_loading(mean, var, loading, lower=None, upper=None):
    """a P(lo < x < hi) (not clamped: within the clipped output's std for |a| <= s)."""
    m, v = _f64(mean), _f64(var)
    s = np.maximum(np.sqrt(v), 1e-300)
    inside = (ndtr((upper - m) / s) if upper is not None else 1.0) - (ndtr((lower - m) / s) if lower is not None else 0.0)
    return _f64(loading) * inside


def _stein_slope(function, m, v, points=40001, width=12.0):
    """E[f'(x)] = E[f(x) (x - m)] / v (Stein's lemma) for x ~ N(m, v) by the trapezoid rule on m +- width s
    (independent of any closed form; f may have kinks); 0 where v = 0 (the loading is 0 there)."""
    s = np.sqrt(v)
    z = np.linspace(-width, width, points)
    weights = np.exp(-0.5 * z * z) * _INV_SQRT_2PI * z
    weights[[0, -1]] *= 0.5
    weights *= z[1] - z[0]
    values = function(m[..., None] + s[..., None] * z)
    return np.where(s > 0, (values @ weights) / np.where(s > 0, s, 1.0), 0.0)


def _mean_slope(moments, m, v):
    """dE[y]/dM of an approximation's mean (Stein: = E[f'(x)] for the exact one), by central differences."""
    h = 1e-6 * (1.0 + np.abs(m))
    return (moments(m + h, v)[0] - moments(m - h, v)[0]) / (2 * h)


def leaky_relu_loading(mean, var, loading, alpha):
    """a (alpha + (1 - alpha) Phi(m / s))."""
    m, v = _f64(mean), _f64(var)
    s = np.sqrt(v)
    slope = np.where(s > 0, ndtr(m / np.where(s > 0, s, 1.0)), (m > 0).astype(float))
    return _f64(loading) * (alpha + (1 - alpha) * slope)


def sigmoid_loading(mean, var, loading):
    """a dE/dM of `sigmoid`'s probit approximation."""
    return _f64(loading) * _mean_slope(sigmoid, _f64(mean), _f64(var))


def tanh_loading(mean, var, loading):
    """a dE/dM of `tanh`'s approximation."""
    return _f64(loading) * _mean_slope(tanh, _f64(mean), _f64(var))


def hard_sigmoid_loading(mean, var, loading, alpha, beta):
    """a E[f'(x)], f = clip(alpha x + beta, 0, 1), by Stein's integral."""
    return _f64(loading) * _stein_slope(lambda x: np.clip(alpha * x + beta, 0.0, 1.0), _f64(mean), _f64(var))


def hard_swish_loading(mean, var, loading, alpha=1 / 6, beta=0.5):
    """a E[f'(x)], f = x clip(alpha x + beta, 0, 1), by Stein's integral."""
    return _f64(loading) * _stein_slope(lambda x: x * np.clip(alpha * x + beta, 0.0, 1.0), _f64(mean), _f64(var))


def smooth_loading(function, mean, var, loading, points=16):
    """a E[f'(x)] for the activations pfpc computes by Gauss-Hermite quadrature, on the same
    nodes (`gauss_hermite`): E[(f(x) - f(M)) (x - M)] / V = 2 / (sqrt(pi) sqrt(2V)) sum w t d."""
    m, v = _f64(mean), _f64(var)
    nodes, weights = np.polynomial.hermite.hermgauss(points)
    spread = np.sqrt(2 * v)
    deltas = function(m[..., None] + spread[..., None] * nodes) - function(m)[..., None]
    total = deltas @ (weights * nodes) * 2 / np.sqrt(np.pi)
    return np.where(spread > 0, _f64(loading) * total / np.where(spread > 0, spread, 1.0), 0.0)


def square_add(x, y):
    """x^2 + y."""
    return _f64(x) ** 2 + _f64(y)


def root(x, var=None):
    """sqrt(max(x, 0)); of a Gaussian (mean x, variance var): sqrt(var)."""
    return np.sqrt(np.maximum(_f64(x if var is None else var), 0.0))


def projection_gain(pooled, root_sum, diagonal_sum):
    """k = sqrt(clip((T - S2) / (S1^2 - S2), 0, 1)), 0 where S1^2 <= S2 (T and S2: values, or
    the variances of Gaussian operands)."""
    t, s1, s2 = _f64(pooled), _f64(root_sum), _f64(diagonal_sum)
    span = s1 * s1 - s2
    return np.sqrt(np.where(span > 0, np.clip((t - s2) / np.where(span > 0, span, 1.0), 0.0, 1.0), 0.0))


# --- the shared dense-layer scale (`--shared-scale`, pfpc/ops/shared_scale.py) ---------------------
def feature_scale_sums(mean, var, loading, alpha, nodes):
    """[N, C, Q] pairs (sum_{i in c} alpha_i E[relu(y_i)^2 | z_q], sum_{i in c} alpha_i^2
    Var(relu(y_i)^2 | z_q)) of y_i = m_i + a_i z + e_i, e_i ~ N(0, max(v_i - a_i^2, 0)); the
    raw moments E[relu(y)^k] of a Gaussian by scipy's truncated normal."""
    m, v, a, w = (_f64(t) for t in (mean, var, loading, alpha))
    n, c = m.shape[:2]
    m, v, a, w = (t.reshape(n, c, -1) for t in (m, v, a, w))
    sums, spreads = [], []
    for node in np.asarray(nodes, np.float64).reshape(-1):
        mu, s = m + a * node, np.sqrt(np.maximum(v - a * a, 0.0))
        second, fourth = (_relu_raw_moment(mu, s, k) for k in (2, 4))
        sums.append((w * second).sum(-1))
        spreads.append((w * w * (fourth - second * second)).sum(-1))
    return np.stack(sums, -1), np.stack(spreads, -1)


def _relu_raw_moment(mu, s, k):
    """E[max(y, 0)^k], y ~ N(mu, s^2): P(y > 0) E[y^k | y > 0] (scipy's truncnorm moment)."""
    out = np.where(mu > 0, mu**k, 0.0)
    positive = s > 0
    z = np.where(positive, -mu / np.where(positive, s, 1.0), 0.0)
    moments = np.zeros_like(mu)
    for index in zip(*np.nonzero(positive)):
        above = ndtr(-z[index])
        if above > 0:
            moments[index] = above * truncnorm.moment(k, z[index], np.inf, loc=mu[index], scale=s[index])
    return np.where(positive, moments, out)


def mixture(mean, var, probability, axis, mean_of_first=False):
    """Components along ``axis`` mixed with probabilities p (broadcast): mean sum p m,
    var sum p (v + m^2) - mean^2; ``mean_of_first``: the mean is component 0's instead."""
    m, v = _f64(mean), _f64(var)
    p = np.broadcast_to(_f64(probability), m.shape)
    mixed = (p * m).sum(axis)
    variance = np.maximum((p * (v + m * m)).sum(axis) - mixed**2, 0.0)
    return (np.take(m, 0, axis) if mean_of_first else mixed), variance


def scale_points(kappa):
    """(p [3, N], lam [3, N]): row 0 the diagonal scenario (p = 0, lam = 1), rows 1, 2 the
    two-point scale with E lam = 1, Var lam = kappa (p = 1/2, lam = 1 -+ sqrt(kappa) while
    kappa <= 1, else lam1 = 0, p1 = kappa / (1 + kappa))."""
    r = np.maximum(_f64(kappa), 0.0)
    p1 = np.where(r <= 1, 0.5, r / (1 + r))
    lam1 = np.maximum(1 - np.sqrt(r * (1 - p1) / p1), 0.0)
    lam2 = 1 + np.sqrt(r * p1 / (1 - p1))
    return np.stack([np.zeros_like(r), p1, 1 - p1]), np.stack([np.ones_like(r), lam1, lam2])


def scale_scenarios(mean, var, scale):
    """[K, N, ...]: the mean repeated, the variance times lam[k, n]."""
    m, v, lam = _f64(mean), _f64(var), _f64(scale)
    extra = (slice(None), slice(None)) + (None,) * (m.ndim - 1)
    return np.broadcast_to(m, lam.shape[:1] + m.shape).copy(), v[None] * lam[extra]


def inverse_noise(noise, bias):
    """1 / (c + s2_b), 0 where that is 0."""
    total = _f64(noise) + _f64(bias)
    return np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 0.0)

def _recurrent_steps(x_mean, x_var, layout, direction):
    """The time-major input and, per direction, its step order (ONNX LSTM/GRU)."""
    if layout == 1:
        x_mean, x_var = np.swapaxes(x_mean, 0, 1), np.swapaxes(x_var, 0, 1)
    steps = x_mean.shape[0]
    orders = {"forward": [range(steps)], "reverse": [range(steps - 1, -1, -1)],
              "bidirectional": [range(steps), range(steps - 1, -1, -1)]}[direction]
    return x_mean, x_var, orders


def _recurrent_outputs(per_direction, layout):
    """Y [T, D, B, H] (layout 1: [B, T, D, H]) and the last states [D, B, H] ([B, D, H])
    from per direction (list of step outputs in time order, last states...)."""
    y_mean = np.stack([np.stack([m for m, _ in steps]) for steps, *_ in per_direction], axis=1)
    y_var = np.stack([np.stack([v for _, v in steps]) for steps, *_ in per_direction], axis=1)
    outs = [(y_mean, y_var)] if layout == 0 else [(np.transpose(y_mean, (2, 0, 1, 3)), np.transpose(y_var, (2, 0, 1, 3)))]
    for k in range(1, len(per_direction[0])):
        mean = np.stack([d[k][0] for d in per_direction])
        var = np.stack([d[k][1] for d in per_direction])
        outs.append((mean, var) if layout == 0 else (np.swapaxes(mean, 0, 1), np.swapaxes(var, 0, 1)))
    return outs


def _gate(x, h, w, r, wb, rb, clip_bound):
    """x W^T + h R^T + Wb + Rb, every term an independent Gaussian, clipped to the cell clip."""
    mean, var = linear(*x, *w, *wb)
    if h is not None:
        mean, var = add(mean, var, *linear(*h, *r, *rb))
    else:
        mean, var = add(mean, var, *rb)
    return clip(mean, var, -clip_bound, clip_bound) if clip_bound is not None else (mean, var)


def _weight_rows(mean, var, d, index, hidden):
    """Rows ``index * hidden : (index + 1) * hidden`` of direction ``d`` of W, R or B."""
    rows = slice(index * hidden, (index + 1) * hidden)
    return mean[d][rows], var[d][rows]


def lstm(x_mean, x_var, w, r, b, h0=None, c0=None, hidden=None, direction="forward", layout=0, clip_bound=None):
    """PFP of ONNX LSTM (gates i, o, f, c; default activations; no peepholes), the cell
    written out step by step with every gate and product an independent Gaussian:
        i = sigmoid(x Wi^T + h Ri^T + Wbi + Rbi)  (o, f alike),  g = tanh(x Wc^T + h Rc^T + Wbc + Rbc)
        C = f C + i g,  H = o tanh(C).
    ``w``, ``r``, ``b``: (mean, var) of W [D, 4H, I], R [D, 4H, H], B [D, 8H] (None: zero);
    ``h0``, ``c0``: (mean, var) [D, B, H] (layout 1: [B, D, H]) or None (zero).
    Returns [(Y), (Y_h), (Y_c)] as (mean, var)."""
    return _recurrent("LSTM", x_mean, x_var, w, r, b, h0, c0, hidden, direction, layout, clip_bound, 0)


def gru(x_mean, x_var, w, r, b, h0=None, hidden=None, direction="forward", layout=0, clip_bound=None, linear_before_reset=0):
    """PFP of ONNX GRU (gates z, r, h; default activations), step by step, independent Gaussians:
        z = sigmoid(x Wz^T + h Rz^T + Wbz + Rbz),  r alike,
        h~ = tanh(x Wh^T + (r h) Rh^T + Rbh + Wbh)            (linear_before_reset 0)
        h~ = tanh(x Wh^T + r (h Rh^T + Rbh) + Wbh)            (linear_before_reset 1)
        H = (1 - z) h~ + z H   (1 - z: mean 1 - E[z], the variance of z).
    Arguments as for `lstm`; returns [(Y), (Y_h)]."""
    return _recurrent("GRU", x_mean, x_var, w, r, b, h0, None, hidden, direction, layout, clip_bound, linear_before_reset)


def _recurrent(op, x_mean, x_var, w, r, b, h0, c0, hidden, direction, layout, clip_bound, linear_before_reset):
    x_mean, x_var = _f64(x_mean), _var_or_zeros(x_var, _f64(x_mean))
    gates = 4 if op == "LSTM" else 3
    w_mean, w_var = _f64(w[0]), _var_or_zeros(w[1], _f64(w[0]))
    r_mean, r_var = _f64(r[0]), _var_or_zeros(r[1], _f64(r[0]))
    hidden = hidden or r_mean.shape[-1]
    if b is None:
        b = (np.zeros((w_mean.shape[0], 2 * gates * hidden)), None)
    b_mean, b_var = _f64(b[0]), _var_or_zeros(b[1], _f64(b[0]))
    x_mean, x_var, orders = _recurrent_steps(x_mean, x_var, layout, direction)

    def initial(state, d):
        if state is None:
            return None
        mean, var = _f64(state[0]), _var_or_zeros(state[1], _f64(state[0]))
        return (mean[d], var[d]) if layout == 0 else (mean[:, d], var[:, d])

    per_direction = []
    for d, order in enumerate(orders):
        def rows(index, which):
            mean, var = {"W": (w_mean, w_var), "R": (r_mean, r_var)}[which]
            return _weight_rows(mean, var, d, index, hidden)

        def bias(index, recurrent):
            return _weight_rows(b_mean, b_var, d, index + gates * recurrent, hidden)

        h, c = initial(h0, d), initial(c0, d)
        steps = [None] * x_mean.shape[0]
        for t in order:
            x = (x_mean[t], x_var[t])
            if op == "LSTM":
                i, o, f, g = (_gate(x, h, rows(k, "W"), rows(k, "R"), bias(k, 0), bias(k, 1), clip_bound) for k in range(4))
                i, o, f, g = sigmoid(*i), sigmoid(*o), sigmoid(*f), tanh(*g)
                cell = multiply(*i, *g)
                c = cell if c is None else add(*multiply(*f, *c), *cell)
                h = multiply(*o, *tanh(*c))
            else:
                z = sigmoid(*_gate(x, h, rows(0, "W"), rows(0, "R"), bias(0, 0), bias(0, 1), clip_bound))
                reset = sigmoid(*_gate(x, h, rows(1, "W"), rows(1, "R"), bias(1, 0), bias(1, 1), clip_bound))
                pre = linear(*x, *rows(2, "W"), *bias(2, 0))
                if linear_before_reset:
                    recurrent = bias(2, 1) if h is None else linear(*h, *rows(2, "R"), *bias(2, 1))
                    pre = add(*pre, *multiply(*reset, *recurrent))
                else:
                    pre = add(*pre, *bias(2, 1))
                    if h is not None:
                        pre = add(*pre, *linear(*multiply(*reset, *h), *rows(2, "R")))
                if clip_bound is not None:
                    pre = clip(*pre, -clip_bound, clip_bound)
                candidate = tanh(*pre)
                new = multiply(1.0 - z[0], z[1], *candidate)
                h = new if h is None else add(*new, *multiply(*z, *h))
            steps[t] = h
        per_direction.append((steps, h) if op == "GRU" else (steps, h, c))
    return _recurrent_outputs(per_direction, layout)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _onnx_reshape_shape(in_shape, shape, allowzero) -> tuple[int, ...]:
    """ONNX Reshape target: 0 copies the input dim (unless allowzero), -1 is inferred."""
    out = []
    for i, s in enumerate(int(x) for x in shape):
        out.append(in_shape[i] if (s == 0 and not allowzero) else s)
    return tuple(out)


def _resolve_pads(auto_pad, pads, in_hw, kernel, strides, dilations):
    """Explicit [top, left, bottom, right] pads from ONNX auto_pad / pads."""
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("", "NOTSET"):
        return tuple(int(p) for p in pads) if pads is not None else (0, 0, 0, 0)
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"auto_pad={auto_pad}")
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def _constant_value(attrs: dict) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    raise NotImplementedError(f"Constant with attributes {sorted(attrs)}")


def _topological(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    order, pending, have = [], list(nodes), set(available) | {""}
    while pending:
        ready = [n for n in pending if all(i in have for i in n.input)]
        if not ready:
            missing = sorted({i for n in pending for i in n.input if i not in have})
            raise ValueError(f"graph has a cycle or undefined inputs: {missing}")
        for n in ready:
            order.append(n)
            have.update(n.output)
        pending = [n for n in pending if n not in ready]
    return order


def _integer_node(node, x):
    """A node on deterministic integer tensors, evaluated by onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: val[0] for name, val in zip(node.input, x) if name}
    values = ReferenceEvaluator(node).run(None, feeds)
    return [(np.asarray(v), np.zeros(np.shape(v))) for v in values]


def _lift_1d(pair):
    """[N, C, L] -> [N, C, 1, L]: 1-D ops are the 2-D ones with a unit height."""
    return None if pair is None else (pair[0][:, :, None, :], pair[1][:, :, None, :])


def _lift_attrs_1d(a):
    lifted = dict(a)
    for key in ("kernel_shape", "strides", "dilations"):
        if key in a:
            lifted[key] = [1] + list(a[key])
    if "pads" in a:
        lifted["pads"] = [0, a["pads"][0], 0, a["pads"][1]]
    return lifted


def _pool_geometry(a, in_hw, default_kernel=None):
    kernel = tuple(a.get("kernel_shape", default_kernel))
    strides = tuple(a.get("strides", (1, 1)))
    dil = tuple(a.get("dilations", (1, 1)))
    pads = _resolve_pads(a.get("auto_pad", "NOTSET"), a.get("pads"), in_hw, kernel, strides, dil)
    return kernel, strides, pads, dil


def _node_outputs(node, a, x):
    """The (mean, var) outputs of one ONNX node on Gaussian inputs ``x``."""
    op = node.op_type
    if op in ("Conv", "MaxPool", "AveragePool") and x[0][0].ndim == 3:
        lifted = [_lift_1d(x[0])] + ([_lift_1d(x[1])] if op == "Conv" else []) + x[1 + (op == "Conv"):]
        outs = _node_outputs(node, _lift_attrs_1d(a), lifted)
        return [(m[:, :, 0, :], v[:, :, 0, :]) for m, v in outs]
    if op == "MatMul":
        return [matmul(*x[0], *x[1])]
    if op == "Gather":  # constant indices into a Gaussian tensor: a copy of the picked elements
        index, axis = x[1][0].astype(np.int64), a.get("axis", 0)
        if x[0][0].dtype.kind in "iub":  # into a shape
            return _integer_node(node, [x[0], (index, None)])
        return [(np.take(x[0][0], index, axis=axis), np.take(x[0][1], index, axis=axis))]
    if op in ("LSTM", "GRU"):
        direction = a.get("direction", b"forward")
        kwargs = dict(hidden=a.get("hidden_size"), direction=direction.decode() if isinstance(direction, bytes) else direction,
                      layout=a.get("layout", 0), clip_bound=a.get("clip"))
        optional = [x[k] if len(x) > k else None for k in (3, 5, 6)]
        if op == "LSTM":
            return lstm(*x[0], x[1], x[2], optional[0], optional[1], optional[2], **kwargs)
        return gru(*x[0], x[1], x[2], optional[0], optional[1], linear_before_reset=a.get("linear_before_reset", 0), **kwargs)
    if op == "Gemm":
        c = x[2] if len(x) > 2 and x[2] is not None else (None, None)
        return [gemm(*x[0], *x[1], *c, alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0),
                     transA=a.get("transA", 0), transB=a.get("transB", 0))]
    if op in ("Add", "Sum"):
        total = x[0]
        for operand in x[1:]:
            total = add(*total, *operand)
        return [total]
    if op == "Sub":
        return [subtract(*x[0], *x[1])]
    if op == "Mul":
        return [multiply(*x[0], *x[1])]
    if op == "Div":
        if np.any(x[1][1]):
            raise NotImplementedError("Div by a Gaussian")
        return [divide(*x[0], x[1][0])]
    if op in ("Conv", "MaxPool", "AveragePool") and x[0][0].ndim == 5:
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError("3-D auto_pad")
        spatial = (1, 1, 1)
        pads, strides, dilations = tuple(a.get("pads", (0,) * 6)), tuple(a.get("strides", spatial)), tuple(a.get("dilations", spatial))
        if op == "Conv":
            b = x[2] if len(x) > 2 and x[2] is not None else (None, None)
            return [conv3d(*x[0], *x[1], *b, strides=strides, pads=pads, dilations=dilations, groups=a.get("group", 1))]
        if op == "MaxPool":
            return [maxpool3d(*x[0], a["kernel_shape"], strides, pads, dilations, a.get("ceil_mode", 0))]
        return [avgpool3d(*x[0], a["kernel_shape"], strides, pads, dilations, a.get("ceil_mode", 0), a.get("count_include_pad", 0))]
    if op == "Conv":
        wm = x[1][0]
        if wm.ndim != 4:
            raise NotImplementedError(f"Conv with {wm.ndim - 2} spatial dims")
        _, strides, pads, dil = _pool_geometry(a, x[0][0].shape[2:], wm.shape[2:])
        b = x[2] if len(x) > 2 and x[2] is not None else (None, None)
        return [conv2d(*x[0], *x[1], *b, strides=strides, pads=pads, dilations=dil, groups=a.get("group", 1))]
    if op == "Relu":
        return [relu(*x[0])]
    if op == "Clip":
        lower = a.get("min", x[1][0] if len(x) > 1 and x[1] is not None else None)
        upper = a.get("max", x[2][0] if len(x) > 2 and x[2] is not None else None)
        return [clip(*x[0], lower, upper)]
    if op == "LeakyRelu":
        return [leaky_relu(*x[0], a.get("alpha", 0.01))]
    if op == "PRelu":
        if np.any(x[1][1]):
            raise NotImplementedError("PRelu with a Gaussian slope")
        return [leaky_relu(*x[0], x[1][0])]
    if op == "Sigmoid":
        return [sigmoid(*x[0])]
    if op == "Tanh":
        return [tanh(*x[0])]
    if op == "BatchNormalization":
        if any(np.any(x[i][1]) for i in (1, 3, 4)):
            raise NotImplementedError("BatchNormalization with a Gaussian scale or statistics")
        return [batch_norm(*x[0], x[1][0], x[2][0], x[3][0], x[4][0], a.get("epsilon", 1e-5), beta_var=x[2][1])]
    if op == "MaxPool":
        if len(node.output) > 1 and node.output[1]:
            raise NotImplementedError("MaxPool with Indices output")
        if x[0][0].ndim != 4:
            raise NotImplementedError(f"MaxPool with {x[0][0].ndim - 2} spatial dims")
        kernel, strides, pads, dil = _pool_geometry(a, x[0][0].shape[2:])
        return [maxpool2d(*x[0], kernel, strides, pads, dil, a.get("ceil_mode", 0))]
    if op == "AveragePool":
        kernel, strides, pads, dil = _pool_geometry(a, x[0][0].shape[2:])
        return [avgpool2d(*x[0], kernel, strides, pads, dil, a.get("ceil_mode", 0), a.get("count_include_pad", 0))]
    if op == "GlobalAveragePool":
        return [reduce_mean(*x[0], list(range(2, x[0][0].ndim)))]
    if op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        axes = a.get("axes", x[1][0] if len(x) > 1 and x[1] is not None else None)
        axes = list(range(x[0][0].ndim)) if axes is None else [int(i) % x[0][0].ndim for i in axes]
        function = {"ReduceMean": reduce_mean, "ReduceSum": reduce_sum, "ReduceMax": reduce_max}[op]
        return [function(*x[0], axes, bool(a.get("keepdims", 1)))]
    if op == "GlobalMaxPool":
        return [reduce_max(*x[0], list(range(2, x[0][0].ndim)))]
    if op == "Neg":
        return [(-x[0][0], x[0][1])]
    if op == "Exp":
        return [exp(*x[0])]
    if op == "Abs":
        return [abs_(*x[0])]
    if op in ("Max", "Min"):
        total = x[0]
        for operand in x[1:]:
            total = (clark_max if op == "Max" else clark_min)(*total, *operand)
        return [total]
    if op == "HardSigmoid":
        return [hard_sigmoid(*x[0], a.get("alpha", 0.2), a.get("beta", 0.5))]
    if op == "HardSwish":
        return [hard_swish(*x[0])]
    if op in ("SiLU", "HardSwishOf"):  # x * Sigmoid(x), x * HardSigmoid(x): see `_gated_products`
        return [gauss_hermite(SMOOTH_FUNCTIONS["silu"](a), *x[0])] if op == "SiLU" else [hard_swish(*x[0], a["alpha"], a["beta"])]
    if op.lower() in SMOOTH_FUNCTIONS:
        return [gauss_hermite(SMOOTH_FUNCTIONS[op.lower()](a), *x[0])]
    if op == "Concat":
        return [concat(x, a["axis"] % x[0][0].ndim)]
    if op == "Transpose":
        perm = a.get("perm", list(reversed(range(x[0][0].ndim))))
        return [(np.transpose(x[0][0], perm), np.transpose(x[0][1], perm))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = a.get("axes", x[1][0] if len(x) > 1 and x[1] is not None else None)
        if op == "Squeeze":
            shape = np.squeeze(x[0][0], axis=None if axes is None else tuple(int(i) for i in axes)).shape
        else:
            shape = np.expand_dims(x[0][0], tuple(int(i) for i in axes)).shape
        return [reshape(*x[0], shape)]
    if op == "Pad":
        pads = a.get("pads", x[1][0] if len(x) > 1 else None)
        value = a.get("value", float(x[2][0]) if len(x) > 2 and x[2] is not None else 0.0)
        rank = x[0][0].ndim
        axes = list(range(rank)) if len(x) < 4 or x[3] is None else [int(i) % rank for i in x[3][0]]
        before, after = [0] * rank, [0] * rank
        for index, axis in enumerate(axes):
            before[axis], after[axis] = int(pads[index]), int(pads[index + len(axes)])
        mode = a.get("mode", b"constant")
        return [pad(*x[0], before, after, value, mode.decode() if isinstance(mode, bytes) else mode)]
    if op == "Slice":
        rank = x[0][0].ndim
        starts, ends = x[1][0], x[2][0]
        axes = x[3][0] if len(x) > 3 and x[3] is not None else range(len(starts))
        steps = x[4][0] if len(x) > 4 and x[4] is not None else [1] * len(starts)
        index = [slice(None)] * rank
        for axis, start, end, step in zip(axes, starts, ends, steps):
            big = 2 ** 62  # NumPy slicing clamps as ONNX does; int64 extremes overflow its C longs
            index[int(axis) % rank] = slice(int(np.clip(start, -big, big)), int(np.clip(end, -big, big)), int(step))
        return [slice_(*x[0], tuple(index))]
    if op == "Split":
        rank = x[0][0].ndim
        axis = a.get("axis", 0) % rank
        sizes = a.get("split", x[1][0] if len(x) > 1 and x[1] is not None else None)
        length = x[0][0].shape[axis]
        if sizes is None:
            part = -(-length // len(node.output))
            sizes = [min(part, length - k * part) for k in range(len(node.output))]
        bounds = np.cumsum([0] + [int(size) for size in sizes])
        return [slice_(*x[0], tuple([slice(None)] * axis + [slice(begin, end)])) for begin, end in zip(bounds, bounds[1:])]
    if op == "ConvTranspose":
        spatial = x[1][0].ndim - 2
        if spatial != 2 or "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError("ConvTranspose other than 2-D with explicit pads")
        pads = a.get("pads", [0] * 4)
        b = x[2] if len(x) > 2 and x[2] is not None else (None, None)
        return [conv_transpose2d(*x[0], *x[1], *b, strides=a.get("strides", (1, 1)), pads=(pads[0], pads[1], pads[2], pads[3]),
                                 dilations=a.get("dilations", (1, 1)), output_padding=a.get("output_padding", (0, 0)),
                                 groups=a.get("group", 1))]
    if op in ("Pow", "Sqrt"):
        if op == "Pow" and (np.any(x[1][1]) or x[1][0].size != 1):
            raise NotImplementedError("Pow with a Gaussian or non-scalar exponent")
        return [power(*x[0], 0.5 if op == "Sqrt" else float(x[1][0].reshape(-1)[0]))]
    if op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        rank, channels = x[0][0].ndim, x[0][0].shape[1]
        scale = x[1]
        bias = x[2] if len(x) > 2 and x[2] is not None else (np.zeros_like(scale[0]), None)
        if op == "LayerNormalization":
            axis = a.get("axis", -1) % rank
            return [layer_norm(*x[0], *scale, *bias, tuple(range(axis, rank)), a.get("epsilon", 1e-5))]
        groups = a["num_groups"] if op == "GroupNormalization" else channels
        if scale[0].size == groups != channels:  # opset 18: one scale per group
            scale, bias = [(np.repeat(p[0], channels // groups), np.repeat(_var_or_zeros(p[1], p[0]), channels // groups)) for p in (scale, bias)]
        return [group_norm(*x[0], *scale, *bias, groups, a.get("epsilon", 1e-5))]
    if op == "LRN":
        return [lrn(*x[0], a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0))]
    if op == "Tile":
        return [tile(*x[0], [int(r) for r in x[1][0]])]
    if op == "Expand":
        return [expand(*x[0], x[1][0])]
    if op in ("Resize", "Upsample"):
        shape = x[0][0].shape
        method = a.get("mode", b"nearest").decode()
        if op == "Upsample" or len(x) == 2:  # Upsample, and Resize-10 (X, scales): asymmetric
            scales = a.get("scales", x[1][0] if len(x) > 1 else None)
            mode, nearest_mode = "asymmetric", "floor"
        else:
            scales = x[2][0] if len(x) > 2 and x[2] is not None and x[2][0].size else None
            mode = a.get("coordinate_transformation_mode", b"half_pixel").decode()
            nearest_mode = a.get("nearest_mode", b"round_prefer_floor").decode()
        sizes = x[3][0] if op == "Resize" and len(x) > 3 and x[3] is not None else [math.floor(d * s) for d, s in zip(shape, scales)]
        if list(sizes[:2]) != list(shape[:2]):
            raise NotImplementedError("Resize over N or C")
        return [resize(*x[0], [int(d) for d in sizes[2:]], method, mode, nearest_mode)]
    if op == "Flatten":
        return [flatten(*x[0], axis=a.get("axis", 1))]
    if op == "Reshape":
        target = _onnx_reshape_shape(x[0][0].shape, x[1][0].astype(np.int64), a.get("allowzero", 0))
        return [reshape(*x[0], target)]
    if op in ("Identity", "Dropout"):
        outs = [x[0]]
        if op == "Dropout" and len(node.output) > 1 and node.output[1]:
            mask = np.ones(x[0][0].shape, dtype=bool)
            outs.append((mask, np.zeros(mask.shape)))
        return outs
    if op == "Constant":
        val = _constant_value(a)
        return [(val.astype(np.float64) if val.dtype.kind == "f" else val, np.zeros(val.shape))]
    raise NotImplementedError(f"pfp_onnx: unsupported op {op}")


def _gated_products(nodes) -> list:
    """Mul(x, Sigmoid(x)) and Mul(x, HardSigmoid(x)) are functions of x alone (the factors are
    not independent): they become one node, "SiLU" or "HardSwishOf" (alpha, beta), of x."""
    producer = {out: node for node in nodes for out in node.output}
    result = []
    for node in nodes:
        if node.op_type == "Mul" and len(node.input) == 2:
            for data, gate in (node.input, node.input[::-1]):
                source = producer.get(gate)
                if source is not None and source.op_type in ("Sigmoid", "HardSigmoid") and source.input[0] == data:
                    a = _attrs(source)
                    attrs = {} if source.op_type == "Sigmoid" else {"alpha": a.get("alpha", 0.2), "beta": a.get("beta", 0.5)}
                    node = onnx.helper.make_node("SiLU" if source.op_type == "Sigmoid" else "HardSwishOf", [data], list(node.output), **attrs)
                    break
        result.append(node)
    return result


def _pools_before_relus(nodes, graph_outputs) -> list:
    """The PFP's order of ReLU -> MaxPool: the max-pool first, on the Gaussian pre-activations,
    then one ReLU per pooled output (exact for deterministic values, since ReLU is monotone).
    Only for a ReLU whose one consumer is the pool, and pools without padding or ceil mode."""
    nodes = list(nodes)
    readers = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    result, moved = [], set()
    for node in nodes:
        if id(node) in moved:
            continue
        users = readers.get(node.output[0], []) if node.op_type == "Relu" else []
        pool = users[0] if len(users) == 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute} if pool is not None else {}
        whole_windows = (pool is not None and pool.op_type == "MaxPool" and len(pool.output) == 1
                         and len(attrs.get("kernel_shape", [])) <= 2  # pfpc moves the ReLU after 1-D and 2-D pools only
                         and not any(attrs.get("pads", [])) and not attrs.get("ceil_mode", 0)
                         and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID"))
        if not whole_windows or node.output[0] in graph_outputs:
            result.append(node)
            continue
        pooled = node.output[0] + "__pooled"
        result.append(helper.make_node("MaxPool", [node.input[0]], [pooled], **attrs))
        result.append(helper.make_node("Relu", [pooled], [pool.output[0]]))
        moved.add(id(pool))
    return result


def pfp_onnx(model: onnx.ModelProto, variances: Mapping[str, np.ndarray],
             inputs: Mapping[str, np.ndarray],
             input_vars: Mapping[str, np.ndarray] | None = None, pools_before_relus: bool = True) -> dict[str, tuple]:
    """Run the PFP over an ONNX graph: returns {output name: (mean, var)} in float64.
    ``pools_before_relus``: ReLU -> MaxPool computed as MaxPool -> ReLU (`_pools_before_relus`).

    Initializers are weights: mean = initializer value, var = variances.get(name, 0).
    Graph inputs are deterministic unless `input_vars` gives their variance.
    Supported: see `_node_outputs`; Softmax/LogSoftmax whose output is a graph output pass
    their input's moments through; nodes on integer tensors (shape arithmetic) are evaluated
    by onnx's reference evaluator. Anything else: NotImplementedError.
    """
    graph = model.graph
    input_vars = input_vars or {}
    env: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for init in graph.initializer:
        m = _f64(numpy_helper.to_array(init))
        v = variances.get(init.name)
        if v is not None and np.shape(v) != m.shape:
            raise ValueError(f"variance of {init.name}: shape {np.shape(v)} != {m.shape}")
        env[init.name] = (m, _var_or_zeros(v, m))
    for name in variances:
        if name not in env:
            raise KeyError(f"variance given for {name!r}, which is not an initializer")
    for inp in graph.input:
        if inp.name in env:
            continue  # old IR: initializers also listed as inputs
        if inp.name not in inputs:
            raise KeyError(f"missing graph input {inp.name!r}")
        m = _f64(inputs[inp.name])
        env[inp.name] = (m, _var_or_zeros(input_vars.get(inp.name), m))

    outputs = {o.name for o in graph.output}
    nodes = _pools_before_relus(graph.node, outputs) if pools_before_relus else graph.node
    nodes = _gated_products(nodes)
    for node in _topological(nodes, set(env)):
        if node.domain not in ("", "ai.onnx"):
            raise NotImplementedError(f"{node.domain}::{node.op_type}")
        x = [env[i] if i else None for i in node.input]
        if node.op_type == "Shape":
            outs = [(np.array(x[0][0].shape, np.int64), np.zeros(1))]
        elif node.op_type != "Constant" and all(i is None or i[0].dtype.kind in "iub" for i in x):
            outs = _integer_node(node, x)  # shape arithmetic
        elif node.op_type in ("Softmax", "LogSoftmax") and all(o in outputs for o in node.output):
            outs = [x[0]]  # the logits' moments: pfpc returns them beside the output's probabilities (<name>_logits_*)
        else:
            outs = _node_outputs(node, _attrs(node), x)
        for name, val in zip(node.output, outs):
            if name:
                env[name] = val

    return {o.name: env[o.name] for o in graph.output}


# --------------------------------------------------------------------------------------
# Monte Carlo ground truth (onnxruntime)
# --------------------------------------------------------------------------------------


def _weights_as_inputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """Copy of `model` in which the initializers `names` are graph inputs instead."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    listed = {i.name for i in m.graph.input}
    for name in names:
        if name not in inits:
            raise KeyError(f"std given for {name!r}, which is not an initializer")
        init = inits[name]
        if name not in listed:
            m.graph.input.append(
                onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    keep = [i for i in m.graph.initializer if i.name not in set(names)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def monte_carlo(model: onnx.ModelProto, stds: Mapping[str, np.ndarray],
                inputs: Mapping[str, np.ndarray], samples: int, seed: int,
                input_stds: Mapping[str, np.ndarray] | None = None,
                with_var_stderr: bool = False,
                shared_noise: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple]:
    """Ground truth by sampling, with onnxruntime (float32) on the CPU.

    Per sample, every initializer named in `stds` is drawn independently as
    value + std * N(0, 1) (and every graph input named in `input_stds` likewise); the
    initializers named in `shared_noise` (an int array of their shape: a group per element,
    -1 = on its own) draw ONE N(0, 1) per group and sample, which every element of the group
    multiplies by its std (a signed std gives a negative correlation); the
    deterministic model is run once per sample (one session: the stochastic initializers
    are made graph inputs). Moments are accumulated in float64.

    Returns {output name: (mean, var, stderr_mean)}: sample mean, unbiased sample variance,
    stderr_mean = sqrt(var / samples). With with_var_stderr=True the tuple has a 4th entry,
    the standard error of the sample variance, sqrt((m4 - m2^2) / samples), from the sample
    central moments m2, m4 (valid for any distribution, e.g. non-Gaussian ReLU outputs).
    """
    import onnxruntime as ort

    if samples < 2:
        raise ValueError("samples must be >= 2")
    input_stds = input_stds or {}
    rng = np.random.default_rng(seed)
    mod = _weights_as_inputs(model, list(stds))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(mod.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                for i in mod.graph.input}

    base = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}
    stochastic = {}  # name -> (mean float64, std float64, ort dtype)
    for name, std in stds.items():
        stochastic[name] = (inits[name].astype(np.float64), np.asarray(std, np.float64),
                            inits[name].dtype)
    for name, std in input_stds.items():
        stochastic[name] = (base[name], np.asarray(std, np.float64), in_types[name])
    fixed = {k: v.astype(in_types.get(k, np.float32)) for k, v in base.items()
             if k not in stochastic}
    out_names = [o.name for o in mod.graph.output]

    shift = None  # power sums are accumulated for (y - first sample): numerically stable
    sums = None
    chunk = 256
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        noise = {name: rng.standard_normal((b,) + mu.shape)
                 for name, (mu, _, _) in stochastic.items()}
        for name, groups in (shared_noise or {}).items():
            groups = np.asarray(groups, np.int64)
            per_group = rng.standard_normal((b, int(groups.max()) + 1))
            noise[name] = np.where(groups >= 0, per_group[:, np.maximum(groups, 0)], noise[name])
        block = None
        for i in range(b):
            feed = dict(fixed)
            for name, (mu, sd, dt) in stochastic.items():
                feed[name] = (mu + sd * noise[name][i]).astype(dt)
            outs = sess.run(out_names, feed)
            if block is None:
                block = [np.empty((b,) + np.shape(o), dtype=np.float64) for o in outs]
            for blk, o in zip(block, outs):
                blk[i] = o
        if shift is None:
            shift = [blk[0].copy() for blk in block]
            sums = [[np.zeros_like(k) for _ in range(4)] for k in shift]
        for blk, k, s in zip(block, shift, sums):
            d = blk - k
            d2 = d * d
            s[0] += d.sum(axis=0)
            s[1] += d2.sum(axis=0)
            s[2] += (d2 * d).sum(axis=0)
            s[3] += (d2 * d2).sum(axis=0)

    n = float(samples)
    result = {}
    for name, k, (s1, s2, s3, s4) in zip(out_names, shift, sums):
        mu = s1 / n  # mean of (y - k)
        m2 = s2 / n - mu * mu
        m4 = s4 / n - 4 * mu * s3 / n + 6 * mu * mu * s2 / n - 3 * mu ** 4
        m2 = np.maximum(m2, 0.0)
        var = m2 * n / (n - 1)
        entry = (k + mu, var, np.sqrt(var / n))
        if with_var_stderr:
            entry = entry + (np.sqrt(np.maximum(m4 - m2 * m2, 0.0) / n),)
        result[name] = entry
    return result
