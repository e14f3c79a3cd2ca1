"""The Gaussian operator library: every PFP operator, defined once, as a TE compute.

A Gaussian tensor is a mean tensor plus one moment tensor in a stated representation:
``"var"`` (the variance v), ``"second_moment"`` (q = m^2 + v) or ``"none"`` (deterministic,
no moment tensor at all). Each operator consumes its operands in whatever representation
they arrive in and produces its *native* representation (the one it computes for free);
`convert` turns one into the other. Zero-padded positions are deterministic zeros.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tvm import te, tirx

from .moments import (
    clark_closed_cdf,
    clark_max_moments,
    clark_tail_ratio,
    clip_moments,
    f32,
    leaky_relu_moments,
    pdf_exponent,
    product_moments,
    relu_moments,
    relu_tail_ratio,
    safe_ratio,
    safe_sqrt,
    std_normal_cdf,
    std_normal_pdf,
    sigmoid_moments,
    tanh_moments,
)

class Moment(enum.StrEnum):
    """How a Gaussian tensor carries its second moment (equal to its value as a string, which is
    how it appears in kernel specs, C names and ``pfp.outputs``)."""

    NONE = "none"  # deterministic: no moment tensor
    VAR = "var"  # the variance v
    SECOND_MOMENT = "second_moment"  # the second raw moment q = m^2 + v


REPRESENTATIONS = tuple(Moment)

#: te.compute attribute of a stage computed once per element and read by several expressions
#: (the exp terms that both moments use): `schedule.schedule_kernel` keeps it in a scalar, never inlines it.
SHARED_ATTR = "pfp.shared"
SHARED = {SHARED_ATTR: 1}
#: A stage kept apart (a row loop of its own, which vectorises) only by the "channel_rows" schedule
#: of application cores; the Cortex-M schedules inline it into its readers (one expression).
ROW_STAGE_ATTR = "pfp.row_stage"
ROW_STAGE = {SHARED_ATTR: 1, ROW_STAGE_ATTR: 1}


@dataclass
class Gaussian:
    """A Gaussian TE tensor: ``mean`` and, unless ``repr == "none"``, ``moment``."""

    mean: te.Tensor
    moment: te.Tensor | None
    repr: str

    @property
    def shape(self):
        return [int(d) for d in self.mean.shape]

    def var_at(self, idx):
        """Variance at ``idx`` as an expression (0 for a deterministic tensor)."""
        if self.repr == "none":
            return f32(0.0)
        if self.repr == "var":
            return self.moment[idx]
        mean = self.mean[idx]
        return tirx.max(self.moment[idx] - mean * mean, f32(0.0))

    def moment_at(self, idx):
        return None if self.repr == "none" else self.moment[idx]


def _pair_sum():
    return te.comm_reducer(
        lambda acc, new: (acc[0] + new[0], acc[1] + new[1]),
        lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)),
        name="pair_sum",
    )


def _reduce_products(out_shape, terms, axes, name):
    """Sum over ``axes`` of the product moments returned by ``terms(*out_idx)``.

    One loop nest, two accumulators sharing the product m_a m_b (``product_moments``).
    """

    def body(*idx):
        mean, var = terms(*idx)
        if var is None:
            return te.sum(mean, axis=axes)
        return _pair_sum()((mean, var), axis=axes)

    probe_mean, probe_var = terms(*[tirx.const(0, "int32")] * len(out_shape))
    del probe_mean
    if probe_var is None:
        mean = te.compute(out_shape, body, name=f"{name}_mean")
        return Gaussian(mean, None, "none")
    mean, var = te.compute(out_shape, body, name=name)
    return Gaussian(mean, var, "var")


def _second_at(g: Gaussian, idx):
    """E[x^2] at ``idx`` as an expression, whatever the representation."""
    mean = g.mean[idx]
    if g.repr == "second_moment":
        return g.moment[idx]
    return mean * mean + (g.moment[idx] if g.repr == "var" else f32(0.0))


def _reduce_shared_draw(out_shape, terms, axes, count, name):
    """A linear output sum_i w_i x_i whose weights share one draw per component (shared-draw
    semantics of a shared posterior): w_i = mu_i + a_i eps_g(i), eps ~ N(0, 1) per component g,
    a_i the signed std, and a weight of group -1 drawn on its own. For inputs independent of
    the weights (mean m_i, variance v_i):

        E[y]   = sum_i mu_i m_i
        Var[y] = sum_i E[w_i^2] v_i + sum_{i: own draw} a_i^2 m_i^2 + sum_g (sum_{i in g} a_i m_i)^2

    (the eps of different components are independent and independent of x, so the cross terms
    between components and with the mean part vanish; within a component the noise is one
    variable whose coefficient is sum_{i in g} a_i x_i, of second moment (sum a_i m_i)^2 +
    sum a_i^2 v_i). ``terms(*idx)`` -> (m_i, v_i or None for a deterministic input, mu_i, E[w_i^2], group_i, a_i); one reduction
    with ``count`` + 2 accumulators: the mean, the ungrouped sum and one grouped sum per component.
    """
    size = count + 2
    reducer = te.comm_reducer(
        lambda acc, new: tuple(acc[k] + new[k] for k in range(size)),
        lambda *dtypes: tuple(tirx.const(0, d) for d in dtypes),
        name="shared_draw_sum",
    )

    def body(*idx):
        x_mean, x_var, w_mean, w_second, group, coeff = terms(*idx)
        group = group.astype("int32")
        noise = coeff * x_mean
        own = tirx.Select(group < 0, noise * noise, f32(0.0))
        # x_var None: a deterministic input, whose sum must not read E[w^2] (its gather would be dead code)
        values = [x_mean * w_mean, own if x_var is None else w_second * x_var + own]
        values += [tirx.Select(group == g, noise, f32(0.0)) for g in range(count)]
        return reducer(tuple(values), axis=axes)

    sums = te.compute(out_shape, body, name=name)
    mean, ungrouped, grouped = sums[0], sums[1], sums[2:]

    def var(*idx):
        total = ungrouped[idx]
        for tensor in grouped:
            total = total + tensor[idx] * tensor[idx]
        return total

    return Gaussian(mean, te.compute(out_shape, var, name=f"{name}_var"), "var")


def matmul(a: Gaussian, b: Gaussian, groups=None, coeff=None, count=0) -> Gaussian:
    """Y = A @ B for independent Gaussian A [..., M, K] and B [..., K, N], batch dimensions
    broadcast as in NumPy.

    mean: M_ij = sum_k m_a[i,k] m_b[k,j]
    var:  V_ij = sum_k Var(a_ik b_kj)       (see ``product_moments``)
    """
    a_shape, b_shape = a.shape, b.shape
    depth = a_shape[-1]
    if b_shape[-2] != depth:
        raise ValueError(f"matmul: inner dimensions differ: {a_shape} @ {b_shape}")
    batch = _broadcast_shape(a_shape[:-2], b_shape[:-2])
    out_shape = list(batch) + [a_shape[-2], b_shape[-1]]
    k = te.reduce_axis((0, depth), name="k")

    def operand_index(shape, idx, row, col):
        return _broadcast_index(shape[:-2], batch, idx[:-2]) + (row, col)

    def terms(*idx):
        ia = operand_index(a_shape, idx, idx[-2], k)
        ib = operand_index(b_shape, idx, k, idx[-1])
        if groups is not None:
            return a.mean[ia], None if a.repr == "none" else a.var_at(ia), b.mean[ib], _second_at(b, ib), groups.mean[ib], coeff.mean[ib]
        return product_moments(a.mean[ia], a.moment_at(ia), a.repr, b.mean[ib], b.moment_at(ib), b.repr)

    if groups is not None:
        return _reduce_shared_draw(out_shape, terms, [k], count, "matmul")
    return _reduce_products(out_shape, terms, [k], "matmul")


def conv2d_window(x_shape, w_shape, strides, pads, dilations, groups):
    """The geometry of a grouped NCHW x OIHW convolution with zero padding, shared by every
    Gaussian convolution: (output shape, reduce axes [c, i, j], ``tap``), where ``tap(n, o, y, xx)``
    gives (inside, input index, weight index) of the reduction's current tap."""
    batch, in_ch, height, width = x_shape
    out_ch, group_ch, kernel_h, kernel_w = w_shape
    pad_top, pad_left, pad_bottom, pad_right = pads
    out_h = (height + pad_top + pad_bottom - dilations[0] * (kernel_h - 1) - 1) // strides[0] + 1
    out_w = (width + pad_left + pad_right - dilations[1] * (kernel_w - 1) - 1) // strides[1] + 1
    if in_ch != group_ch * groups or out_ch % groups:
        raise ValueError(f"conv2d: {in_ch} input channels do not split into {groups} groups of {group_ch}")
    out_per_group = out_ch // groups
    c = te.reduce_axis((0, group_ch), name="c")
    i = te.reduce_axis((0, kernel_h), name="i")
    j = te.reduce_axis((0, kernel_w), name="j")

    def tap(n, o, y, xx):
        row = y * strides[0] + i * dilations[0] - pad_top
        col = xx * strides[1] + j * dilations[1] - pad_left
        inside = tirx.all(row >= 0, row < height, col >= 0, col < width)
        return inside, (n, (o // out_per_group) * group_ch + c, row, col), (o, c, i, j)

    return [batch, out_ch, out_h, out_w], [c, i, j], tap


def second_of_weights(w_shape, strides) -> bool:
    """Whether a convolution's Var(x w) takes each weight's second moment (`product_moments`'
    ``second_of_b``): a window row of several taps at stride 1, where a register block of B
    positions reads B + K - 1 inputs per K weights, so each weight's second moment and each
    input's square are formed, not each input's second moment and each weight's square."""
    return int(w_shape[3]) > 1 and int(strides[1]) == 1


def conv2d(x: Gaussian, w: Gaussian, strides, pads, dilations, groups, draw_groups=None, coeff=None, count=0,
           weight_second=None) -> Gaussian:
    """Y = conv2d(X, W), NCHW x OIHW, zero padding (deterministic zeros), grouped.

    mean: M[n,o,y,x] = sum_{c,i,j} m_x[n, g*C+c, y*sh + i*dh - pt, x*sw + j*dw - pl] m_w[o,c,i,j]
    var:  V[n,o,y,x] = the same sum over Var(x w)   (see ``product_moments``)

    ``weight_second``: the weights' second moments mu^2 + s2 (deterministic, W's shape), folded at
    compile time (`FoldWeightMoments`), where `second_of_weights` holds: read, not formed per weight.
    """
    out_shape, axes, tap = conv2d_window(x.shape, w.shape, strides, pads, dilations, groups)
    weights_second = second_of_weights(w.shape, strides)

    def terms(n, o, y, xx):
        inside, ix, iw = tap(n, o, y, xx)
        x_mean = tirx.if_then_else(inside, x.mean[ix], f32(0.0))
        if draw_groups is not None:
            x_var = None if x.repr == "none" else tirx.if_then_else(inside, x.var_at(ix), f32(0.0))
            return x_mean, x_var, w.mean[iw], _second_at(w, iw), draw_groups.mean[iw], coeff.mean[iw]
        x_moment = None if x.repr == "none" else tirx.if_then_else(inside, x.moment[ix], f32(0.0))
        second = None if weight_second is None else weight_second.mean[iw]
        return product_moments(x_mean, x_moment, x.repr, w.mean[iw], w.moment_at(iw), w.repr, weights_second, second)

    if draw_groups is not None:
        return _reduce_shared_draw(out_shape, terms, axes, count, "conv2d")
    return _reduce_products(out_shape, terms, axes, "conv2d")


def _broadcast_index(shape, out_shape, idx):
    offset = len(out_shape) - len(shape)
    return tuple(0 if dim == 1 and out_shape[offset + axis] != 1 else idx[offset + axis] for axis, dim in enumerate(shape))


def _elementwise(a: Gaussian, b: Gaussian, mean_of, var_of, name) -> Gaussian:
    """Y[i] from A and B (NumPy broadcasting): ``mean_of(a_idx, b_idx)``, ``var_of(a_idx, b_idx)``."""
    out_shape = _broadcast_shape(a.shape, b.shape)

    def split(idx):
        return _broadcast_index(a.shape, out_shape, idx), _broadcast_index(b.shape, out_shape, idx)

    mean = te.compute(out_shape, lambda *idx: mean_of(*split(idx)), name=f"{name}_mean")
    if a.repr == "none" and b.repr == "none":
        return Gaussian(mean, None, "none")
    var = te.compute(out_shape, lambda *idx: var_of(*split(idx)), name=f"{name}_var")
    return Gaussian(mean, var, "var")


def add(a: Gaussian, b: Gaussian) -> Gaussian:
    """Y = A + B (NumPy broadcasting) for independent A, B: means add, variances add."""
    return _elementwise(a, b, lambda i, j: a.mean[i] + b.mean[j], lambda i, j: a.var_at(i) + b.var_at(j), "add")


def subtract(a: Gaussian, b: Gaussian) -> Gaussian:
    """Y = A - B (NumPy broadcasting) for independent A, B: means subtract, variances add."""
    return _elementwise(a, b, lambda i, j: a.mean[i] - b.mean[j], lambda i, j: a.var_at(i) + b.var_at(j), "subtract")


def multiply(a: Gaussian, b: Gaussian) -> Gaussian:
    """Y = A * B element-wise (NumPy broadcasting) for independent A, B: E = m_a m_b,
    Var = m_a^2 v_b + v_a m_b^2 + v_a v_b (``product_moments``); a constant c gives c^2 v."""

    def moments(i, j):
        return product_moments(a.mean[i], a.moment_at(i), a.repr, b.mean[j], b.moment_at(j), b.repr)

    return _elementwise(a, b, lambda i, j: moments(i, j)[0], lambda i, j: moments(i, j)[1], "multiply")


def divide(a: Gaussian, b: Gaussian) -> Gaussian:
    """Y = A / c element-wise (NumPy broadcasting) for a DETERMINISTIC divisor c (its moment is
    not read; the substitution refuses a stochastic one): E = m / c, Var = v / c^2."""
    return _elementwise(
        a,
        Gaussian(b.mean, None, "none"),
        lambda i, j: a.mean[i] / b.mean[j],
        lambda i, j: a.var_at(i) / (b.mean[j] * b.mean[j]),
        "divide",
    )


def scale(a: Gaussian, factor: float) -> Gaussian:
    """Y = c X for a constant c: mean c m, variance c^2 v (second moment c^2 q)."""
    mean = te.compute(a.shape, lambda *idx: a.mean[idx] * f32(factor), name="scale_mean")
    if a.repr == "none":
        return Gaussian(mean, None, "none")
    moment = te.compute(a.shape, lambda *idx: a.moment[idx] * f32(factor * factor), name="scale_moment")
    return Gaussian(mean, moment, a.repr)


def transpose(a: Gaussian, axes) -> Gaussian:
    """Y = transpose(X, axes): a layout change, applied to the mean and the moment alike."""
    out_shape = [a.shape[axis] for axis in axes]
    inverse = [axes.index(axis) for axis in range(len(axes))]

    def source(idx):
        return tuple(idx[inverse[axis]] for axis in range(len(axes)))

    mean = te.compute(out_shape, lambda *idx: a.mean[source(idx)], name="transpose_mean")
    if a.repr == "none":
        return Gaussian(mean, None, "none")
    moment = te.compute(out_shape, lambda *idx: a.moment[source(idx)], name="transpose_moment")
    return Gaussian(mean, moment, a.repr)


def relu(a: Gaussian) -> Gaussian:
    """Y = max(X, 0); moments from ``relu_moments``; native output: variance (computed directly,
    never as E[y^2] - E[y]^2, which cancels in float32 for concentrated inputs)."""
    if a.repr == "none":
        mean = te.compute(a.shape, lambda *idx: tirx.max(a.mean[idx], f32(0.0)), name="relu_mean")
        return Gaussian(mean, None, "none")
    # s, z, phi(z) and Phi(z) once per element, each a stage of its own that the moments read (see
    # `relu_terms`): on SIMD targets each stage is a row loop that vectorises
    std = te.compute(a.shape, lambda *idx: safe_sqrt(a.var_at(idx)), name="relu_std", attrs=SHARED)
    z = te.compute(a.shape, lambda *idx: safe_ratio(a.mean[idx], std[idx]), name="relu_z", attrs=SHARED)
    exponent = te.compute(a.shape, lambda *idx: pdf_exponent(z[idx]), name="relu_exponent", attrs=SHARED)
    pdf = te.compute(a.shape, lambda *idx: std_normal_pdf(z[idx], exponent[idx]), name="relu_pdf", attrs=SHARED)
    cdf = te.compute(a.shape, lambda *idx: std_normal_cdf(z[idx], pdf[idx]), name="relu_cdf", attrs=SHARED)
    tail = te.compute(a.shape, lambda *idx: relu_tail_ratio(z[idx]), name="relu_tail", attrs=SHARED)
    mean, var = te.compute(
        a.shape, lambda *idx: relu_moments(a.mean[idx], a.var_at(idx), (cdf[idx], pdf[idx], std[idx], z[idx], tail[idx])), name="relu"
    )
    return Gaussian(mean, var, "var")


def _unary_moments(a: Gaussian, moments, deterministic, name, native) -> Gaussian:
    """An element-wise nonlinearity: ``moments(mean, var)`` -> (E[y], native moment of y)."""
    if a.repr == "none":
        return Gaussian(te.compute(a.shape, lambda *idx: deterministic(a.mean[idx]), name=f"{name}_mean"), None, "none")
    mean, moment = te.compute(a.shape, lambda *idx: moments(a.mean[idx], a.var_at(idx)), name=name)
    return Gaussian(mean, moment, native)


def clip(a: Gaussian, lower, upper) -> Gaussian:
    """Y = min(max(X, lower), upper) (Clip, Relu6; None = unbounded); moments from
    ``clip_moments``; native output: variance."""

    def plain(mean):
        mean = mean if lower is None else tirx.max(mean, f32(lower))
        return mean if upper is None else tirx.min(mean, f32(upper))

    return _unary_moments(a, lambda m, v: clip_moments(m, v, lower, upper), plain, "clip", "var")


def leaky_relu(a: Gaussian, alpha: float) -> Gaussian:
    """Y = X if X > 0 else alpha X; moments from ``leaky_relu_moments``; native: variance."""

    def plain(mean):
        return tirx.Select(mean > f32(0.0), mean, mean * f32(alpha))

    return _unary_moments(a, lambda m, v: leaky_relu_moments(m, v, f32(alpha)), plain, "leaky_relu", "var")


def prelu(a: Gaussian, slope: Gaussian, axis: int) -> Gaussian:
    """Y = X if X > 0 else slope[c] X, c the index along ``axis``, for a DETERMINISTIC slope
    tensor (its moment is not read; the substitution refuses a stochastic one); moments from
    ``leaky_relu_moments``; native output: variance."""
    # A one-element slope (ONNX [1], PyTorch's nn.PReLU()) broadcasts: the importer gives it
    # shape (1,) on the last axis whatever that axis' length, so it is always read at 0.
    broadcast = int(slope.shape[0]) == 1

    def slope_at(idx):
        return slope.mean[0] if broadcast else slope.mean[idx[axis]]

    if a.repr == "none":
        def plain(*idx):
            mean = a.mean[idx]
            return tirx.Select(mean > f32(0.0), mean, mean * slope_at(idx))

        return Gaussian(te.compute(a.shape, plain, name="prelu_mean"), None, "none")
    mean, var = te.compute(
        a.shape, lambda *idx: leaky_relu_moments(a.mean[idx], a.var_at(idx), slope_at(idx)), name="prelu"
    )
    return Gaussian(mean, var, "var")


def sigmoid(a: Gaussian) -> Gaussian:
    """Y = sigmoid(X); probit approximation ``sigmoid_moments``; native output: variance."""
    return _unary_moments(a, sigmoid_moments, lambda m: f32(1.0) / (f32(1.0) + tirx.exp(f32(0.0) - m)), "sigmoid", "var")


def tanh(a: Gaussian) -> Gaussian:
    """Y = tanh(X); approximation ``tanh_moments``; native output: variance."""
    return _unary_moments(a, tanh_moments, tirx.tanh, "tanh", "var")


def _pool_windows(shape, kernel, strides, pads, dilations, ceil_mode):
    """Output size, reduction axes (i, j) and ``window(y, x) -> (row, col, inside)`` of a 2-D
    pooling over NCHW ``shape``. With ceil_mode a window that would start in the end padding
    is dropped (ONNX, onnxruntime, PyTorch)."""
    _, _, height, width = shape
    pad_top, pad_left, pad_bottom, pad_right = pads

    def out_size(size, pad_begin, pad_end, k, s, d):
        span = size + pad_begin + pad_end - d * (k - 1) - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        return out - 1 if ceil_mode and (out - 1) * s >= size + pad_begin else out

    out_h = out_size(height, pad_top, pad_bottom, kernel[0], strides[0], dilations[0])
    out_w = out_size(width, pad_left, pad_right, kernel[1], strides[1], dilations[1])
    i = te.reduce_axis((0, kernel[0]), name="i")
    j = te.reduce_axis((0, kernel[1]), name="j")

    def window(y, xx):
        row = y * strides[0] + i * dilations[0] - pad_top
        col = xx * strides[1] + j * dilations[1] - pad_left
        return row, col, tirx.all(row >= 0, row < height, col >= 0, col < width)

    return out_h, out_w, (i, j), window


def _window_count(start, kernel, dilation, low, high):
    """How many of start + i*dilation (0 <= i < kernel) lie in [low, high) (integer TIR)."""

    def ceil_div(num):
        return tirx.floordiv(num + dilation - 1, dilation)

    first = tirx.max(ceil_div(low - start), 0)
    last = tirx.min(ceil_div(high - start), kernel)
    return tirx.max(last - first, 0)


def avgpool2d(x: Gaussian, kernel, strides, pads, dilations, ceil_mode=False, count_include_pad=False) -> Gaussian:
    """Y = average of X (NCHW) over each window of n counted elements:

    mean = sum(m) / n,   var = sum(v) / n^2     (the n inputs are independent; NOT avg(v)/n)

    n counts the window positions inside the input, or with ``count_include_pad`` inside the
    padded input (positions that ceil_mode adds past the padding never count). Padded
    positions are deterministic zeros. Native output: variance."""
    batch, chans, height, width = x.shape
    pad_top, pad_left, pad_bottom, pad_right = pads
    out_h, out_w, (i, j), window = _pool_windows(x.shape, kernel, strides, pads, dilations, ceil_mode)

    def count(n, c, y, xx):
        low_h, high_h = (-pad_top, height + pad_bottom) if count_include_pad else (0, height)
        low_w, high_w = (-pad_left, width + pad_right) if count_include_pad else (0, width)
        rows = _window_count(y * strides[0] - pad_top, kernel[0], dilations[0], low_h, high_h)
        cols = _window_count(xx * strides[1] - pad_left, kernel[1], dilations[1], low_w, high_w)
        return (rows * cols).astype("float32")

    def terms(n, c, y, xx):
        row, col, inside = window(y, xx)
        mean = tirx.if_then_else(inside, x.mean[n, c, row, col], f32(0.0))
        var = None if x.repr == "none" else tirx.if_then_else(inside, x.var_at((n, c, row, col)), f32(0.0))
        return mean, var

    total = _reduce_products([batch, chans, out_h, out_w], terms, [i, j], "avgpool_sum")
    return _divide_by_count(total, count, "avgpool")


def _divide_by_count(total: Gaussian, count, name) -> Gaussian:
    """(sum m, sum v) -> (sum m / n, sum v / n^2) for the count expression ``count(*idx)``."""
    mean = te.compute(total.shape, lambda *idx: total.mean[idx] / count(*idx), name=f"{name}_mean")
    if total.repr == "none":
        return Gaussian(mean, None, "none")
    var = te.compute(total.shape, lambda *idx: total.moment[idx] / (count(*idx) * count(*idx)), name=f"{name}_var")
    return Gaussian(mean, var, "var")


def reduce_mean(x: Gaussian, axes, keepdims=True) -> Gaussian:
    """Y = mean of X over ``axes`` (GlobalAveragePool, ReduceMean) of n elements:
    mean = sum(m) / n, var = sum(v) / n^2. Native output: variance."""
    shape = x.shape
    axes = sorted(axis % len(shape) for axis in axes)
    reduce = {axis: te.reduce_axis((0, shape[axis]), name=f"r{axis}") for axis in axes}
    kept = [axis for axis in range(len(shape)) if axis not in reduce]
    out_shape = [1 if axis in reduce else shape[axis] for axis in range(len(shape))] if keepdims else [shape[a] for a in kept]
    elements = 1
    for axis in axes:
        elements *= shape[axis]

    def terms(*idx):
        full = {axis: idx[axis] for axis in kept} if keepdims else dict(zip(kept, idx))
        source = tuple(reduce[axis] if axis in reduce else full[axis] for axis in range(len(shape)))
        return x.mean[source], None if x.repr == "none" else x.var_at(source)

    total = _reduce_products(out_shape, terms, [reduce[axis] for axis in axes], "mean_sum")
    return _divide_by_count(total, lambda *idx: f32(float(elements)), "mean")


def concat(operands, axis: int) -> Gaussian:
    """Y = concatenation of independent X_1..X_n along ``axis``: means and variances alike
    (a deterministic operand contributes variance 0). Native output: variance."""
    shapes = [g.shape for g in operands]
    axis = axis % len(shapes[0])
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + shape[axis])
    out_shape = list(shapes[0])
    out_shape[axis] = offsets[-1]

    def pick(value_of):
        def body(*idx):
            result = None  # the last operand, then each earlier one where idx[axis] < its end
            for g, start, end in reversed(list(zip(operands, offsets, offsets[1:]))):
                local = tuple(idx[:axis]) + (idx[axis] - start,) + tuple(idx[axis + 1 :])
                value = value_of(g, local)
                result = value if result is None else tirx.if_then_else(idx[axis] < end, value, result)
            return result

        return body

    mean = te.compute(out_shape, pick(lambda g, idx: g.mean[idx]), name="concat_mean")
    if all(g.repr == "none" for g in operands):
        return Gaussian(mean, None, "none")
    var = te.compute(out_shape, pick(lambda g, idx: g.var_at(idx)), name="concat_var")
    return Gaussian(mean, var, "var")


def pad(x: Gaussian, width, value: float = 0.0) -> Gaussian:
    """Y = X padded by ``width`` = [before_0, after_0, before_1, ...] with the constant c:
    padded positions are deterministic (mean c, variance 0, second moment c^2)."""
    shape = x.shape
    out_shape = [size + width[2 * axis] + width[2 * axis + 1] for axis, size in enumerate(shape)]

    def fill(source, padding):
        def body(*idx):
            local = tuple(i - width[2 * axis] for axis, i in enumerate(idx))
            inside = tirx.all(*[tirx.all(i >= 0, i < size) for i, size in zip(local, shape)])
            return tirx.if_then_else(inside, source[local], f32(padding))

        return body

    mean = te.compute(out_shape, fill(x.mean, value), name="pad_mean")
    if x.repr == "none":
        return Gaussian(mean, None, "none")
    padding = 0.0 if x.repr == "var" else value * value
    moment = te.compute(out_shape, fill(x.moment, padding), name="pad_moment")
    return Gaussian(mean, moment, x.repr)


def maxpool2d(x: Gaussian, kernel, strides, pads, dilations, ceil_mode=False, loading: Gaussian | None = None,
              loading_out: bool | str = False) -> Gaussian:
    """Y = max over each window of X (NCHW), Clark's max applied pairwise in row-major window
    order; padded positions are skipped (ONNX pads MaxPool with -inf). Native output: variance
    (``clark_max_moments`` computes it directly). A deterministic input gives the plain max.

    ``loading`` (deterministic, the shape of X; stage ``maxpool2d_correlated``): the window's
    elements share their channel's latent, x = m + a z + e (docs/covariance.md), so two of them
    have covariance a1 a2 and Clark's max of correlated Gaussians takes
        th = sqrt(v1 + v2 - 2 a1 a2) = sqrt((a1 - a2)^2 + e1 + e2),  e = max(v - a^2, 0),  al = (m1 - m2) / th
    (the second form: no cancellation where neighbours are almost fully correlated)
    in place of sqrt(v1 + v2) (the moments' formulas are otherwise the same); the accumulated
    maximum's loading is a1 Phi(al) + a2 Phi(-al) (Stein's lemma), read by the next step.
    ``loading_out`` (stage ``maxpool2d_loading``): that loading of the window's maximum is the
    output (deterministic), for a mean over positions after the max-pool. ``loading_out="with_moments"``:
    (the maxima's moments, their loadings) from one chain of steps, for a consumer in the same kernel
    (`feature_scale_sums`). Either takes Clark's closed form only (no tail form's polynomials): the
    loading reads Phi(al) alone, which a clear winner's cancelling variance hardly moves, and
    `feature_scale_sums` reads the variance in v - a^2 beside m^2-sized raw moments, where its
    absolute error (7.5e-8 d^2) is negligible."""
    batch, chans, height, width = x.shape
    pad_top, pad_left = pads[0], pads[1]
    out_h, out_w, (i, j), window = _pool_windows(x.shape, kernel, strides, pads, dilations, ceil_mode)

    if x.repr == "none":
        def body(n, c, y, xx):
            row, col, inside = window(y, xx)
            lowest = tirx.min_value("float32")
            return te.max(tirx.if_then_else(inside, x.mean[n, c, row, col], lowest), axis=[i, j])

        return Gaussian(te.compute([batch, chans, out_h, out_w], body, name="maxpool_mean"), None, "none")

    # Clark's max as a chain of element-wise stages over the window positions (row-major), each
    # step's terms in stages of their own, so that both moments share them.
    out_shape = [batch, chans, out_h, out_w]
    correlated = loading is not None

    def reaches_input(offset, axis, size, count):
        """Whether window element ``offset`` along ``axis`` lies inside the input for some output."""
        pad = pads[axis]
        return any(0 <= y * strides[axis] + offset * dilations[axis] - pad < size for y in range(count))

    # window elements that are padding for every output are no step at all (their Clark steps
    # would be identities whose terms TVM's simplifier removes, leaving dangling buffers)
    positions = [(pi, pj) for pi in range(kernel[0]) for pj in range(kernel[1])
                 if reaches_input(pi, 0, height, out_h) and reaches_input(pj, 1, width, out_w)]

    def at(position, n, c, y, xx):
        """(inside, mean, var) of window element ``position`` of output (n, c, y, xx)."""
        row = y * strides[0] + position[0] * dilations[0] - pad_top
        col = xx * strides[1] + position[1] * dilations[1] - pad_left
        inside = tirx.all(row >= 0, row < height, col >= 0, col < width)
        return (inside, tirx.if_then_else(inside, x.mean[n, c, row, col], f32(0.0)),
                tirx.if_then_else(inside, x.var_at((n, c, row, col)), f32(0.0)),
                tirx.if_then_else(inside, loading.mean[n, c, row, col], f32(0.0)) if correlated else None)

    def covered(offset, axis, size, count):
        """The outputs along ``axis`` whose window element ``offset`` lies inside the input."""
        pad = pads[axis]
        return {y for y in range(count) if 0 <= y * strides[axis] + offset * dilations[axis] - pad < size}

    rows = {p: covered(p, 0, height, out_h) for p in {p for p, _ in positions}}
    cols = {p: covered(p, 1, width, out_w) for p in {p for _, p in positions}}

    def always_inside(position):
        """Whether window element ``position`` lies inside the input for every output."""
        return rows[position[0]] == set(range(out_h)) and cols[position[1]] == set(range(out_w))

    def meets_earlier(k):
        """Whether some output has window element k and an earlier one inside the input: only
        then does step k take a max. Otherwise it only picks element k where it is inside; its
        Clark stages would be dead code that TVM's simplifier cuts loose from the accumulator
        they read, leaving a buffer used before its definition."""
        pi, pj = positions[k]
        return any(rows[pi] & rows[qi] and cols[pj] & cols[qj] for qi, qj in positions[:k])

    def seen_before(k, n, c, y, xx):
        return tirx.any(*[at(p, n, c, y, xx)[0] for p in positions[:k]]) if k > 1 else at(positions[0], n, c, y, xx)[0]

    def first(n, c, y, xx):
        _inside, mean, var, load = at(positions[0], n, c, y, xx)
        return (mean, var, load) if correlated else (mean, var)

    def pick_step(k, acc):
        """Window element k where it is inside the input (no earlier element is), else the accumulated."""

        def step(n, c, y, xx):
            inside, *element = at(positions[k], n, c, y, xx)
            return tuple(tirx.Select(tirx.Not(inside), a[n, c, y, xx], e) for a, e in zip(acc, element))

        return te.compute(out_shape, step, name=f"maxpool_{k}", attrs=SHARED)

    def clark_step(k, acc):
        """max(accumulated, window element k): a, al, phi(al), Phi(al) each a stage of its own (see
        `relu`: on SIMD targets each is a row loop that vectorises), then both moments."""
        acc_mean, acc_var = acc[0], acc[1]

        def stage(name, body):
            return te.compute(out_shape, body, name=f"maxpool_{name}_{k}", attrs=SHARED)

        # window element k gathered into a row of its own where rows vectorise (`ROW_STAGE`):
        # read from the input under the tail form's and the pick's branches, gcc could not prove
        # the loads safe to do unconditionally and left those row loops scalar
        gathered = te.compute(out_shape, lambda *here: tuple(v for v in at(positions[k], *here)[1:] if v is not None),
                              name=f"maxpool_element_{k}", attrs=ROW_STAGE)
        gathered = gathered if isinstance(gathered, (list, tuple)) else (gathered,)

        def element(n, c, y, xx):
            """(inside, mean, var, load) of window element k, its values read from the gathered row."""
            here = (n, c, y, xx)
            return (at(positions[k], n, c, y, xx)[0], gathered[0][here], gathered[1][here],
                    gathered[2][here] if correlated else None)

        def spread_of(n, c, y, xx):
            _inside, _mean, var, load = element(n, c, y, xx)
            if not correlated:
                return safe_sqrt(acc_var[n, c, y, xx] + var)
            acc_load = acc[2][n, c, y, xx]
            apart = acc_load - load  # (a1 - a2)^2 + e1 + e2: no cancellation of v1 + v2 against 2 a1 a2
            return safe_sqrt(apart * apart + tirx.max(acc_var[n, c, y, xx] - acc_load * acc_load, f32(0.0))
                             + tirx.max(var - load * load, f32(0.0)))

        spread = stage("spread", spread_of)
        alpha = stage("alpha", lambda n, c, y, xx: safe_ratio(acc_mean[n, c, y, xx] - element(n, c, y, xx)[1],
                                                               spread[n, c, y, xx]))
        exponent = stage("exponent", lambda n, c, y, xx: pdf_exponent(alpha[n, c, y, xx]))
        pdf = stage("pdf", lambda n, c, y, xx: std_normal_pdf(alpha[n, c, y, xx], exponent[n, c, y, xx]))
        # |al| in a row of its own where rows vectorise (`ROW_STAGE`): gcc folded the tail test
        # max(al, -al) >= 2 into a select between two tests, whose mixed boolean vector types its vectoriser rejects
        distance = None if loading_out else te.compute(
            out_shape, lambda n, c, y, xx: tirx.max(alpha[n, c, y, xx], f32(0.0) - alpha[n, c, y, xx]),
            name=f"maxpool_distance_{k}", attrs=ROW_STAGE)
        if loading_out or correlated:  # the loadings' step reads Phi everywhere
            cdf = stage("cdf", lambda n, c, y, xx: std_normal_cdf(alpha[n, c, y, xx], pdf[n, c, y, xx]))
        else:  # with the tail form, Phi only where the closed form reads it
            cdf = stage("cdf", lambda n, c, y, xx: clark_closed_cdf(alpha[n, c, y, xx], pdf[n, c, y, xx], distance[n, c, y, xx]))
        # the tail form's polynomials in a branch of their own, read by both moments
        tail = None if loading_out else stage("tail", lambda n, c, y, xx: clark_tail_ratio(alpha[n, c, y, xx], distance[n, c, y, xx]))

        def clark(n, c, y, xx):
            _inside, mean, var, load = element(n, c, y, xx)
            here = (n, c, y, xx)
            terms = (spread[here], cdf[here], pdf[here], alpha[here]) + (() if tail is None else (tail[here],))
            max_mean, max_var = clark_max_moments(acc_mean[here], acc_var[here], mean, var, terms,
                                                  tail_form=not loading_out, covariance=acc[2][here] * load if correlated else None,
                                                  distance=None if distance is None else distance[here])
            if not correlated:
                return max_mean, max_var
            return max_mean, max_var, acc[2][here] * cdf[here] + load * (f32(1.0) - cdf[here])

        if always_inside(positions[0]) and always_inside(positions[k]):
            # every output's window holds elements 0 and k: nothing to pick, the max is the step
            return te.compute(out_shape, clark, name=f"maxpool_{k}", attrs=SHARED)
        # the max in a stage of its own, the pick in the next: with both in one loop body, gcc 12's
        # jump threading of the pick's index tests reported a false -Wmaybe-uninitialized
        maxed = stage("max", clark)
        maxed = maxed if isinstance(maxed, (list, tuple)) else (maxed,)

        def step(n, c, y, xx):
            inside, mean, var, load = element(n, c, y, xx)
            here = (n, c, y, xx)
            seen = seen_before(k, n, c, y, xx)

            def pick(acc_value, new_value, max_value):  # padding is skipped; the first valid element is taken as is
                return tirx.Select(tirx.Not(inside), acc_value, tirx.Select(tirx.Not(seen), new_value, max_value))

            news = (mean, var, load) if correlated else (mean, var)
            return tuple(pick(a[here], e, m[here]) for a, e, m in zip(acc, news, maxed))

        return te.compute(out_shape, step, name=f"maxpool_{k}", attrs=SHARED)

    acc = te.compute(out_shape, first, name="maxpool_0", attrs=SHARED)
    for k in range(1, len(positions)):
        acc = (clark_step if meets_earlier(k) else pick_step)(k, acc)
    if loading_out == "with_moments":
        return Gaussian(acc[0], acc[1], "var"), Gaussian(acc[2], None, "none")
    if loading_out:
        return Gaussian(acc[2], None, "none")
    return Gaussian(acc[0], acc[1], "var")


def convert(a: Gaussian, target: str) -> Gaussian:
    """Change representation: q = m^2 + v, or v = max(q - m^2, 0)."""
    if target == a.repr:
        return a
    if a.repr == "none":
        raise ValueError("a deterministic tensor has no moment to convert")
    if target == "var":
        moment = te.compute(a.shape, lambda *idx: a.var_at(idx), name="to_var")
    elif target == "second_moment":
        moment = te.compute(
            a.shape, lambda *idx: a.mean[idx] * a.mean[idx] + a.moment[idx], name="to_second_moment"
        )
    else:
        raise ValueError(f"cannot convert a {a.repr} tensor to {target}")
    return Gaussian(a.mean, moment, target)


def _broadcast_shape(shape_a, shape_b):
    rank = max(len(shape_a), len(shape_b))
    padded_a = [1] * (rank - len(shape_a)) + list(shape_a)
    padded_b = [1] * (rank - len(shape_b)) + list(shape_b)
    out = []
    for dim_a, dim_b in zip(padded_a, padded_b):
        if dim_a != dim_b and 1 not in (dim_a, dim_b):
            raise ValueError(f"shapes {shape_a} and {shape_b} do not broadcast")
        out.append(max(dim_a, dim_b))
    return out
