"""Float64 NumPy reference of the PFP with per-channel shared noise ("channel" covariance).

Independent of pfpc (imports only tests/reference.py, the diagonal PFP reference). Prototype of
issue 16: in a convolution every output position of a channel is computed with the SAME random
weights, so the positions of a channel are correlated; a global average pool (or a dense layer
over flattened positions) then needs that covariance, which the diagonal PFP drops.

Representation. Every activation x[c, p] (channel c, position p) is
    x[c, p] = m[c, p] + a[c, p] z_c + e[c, p],
z_c ~ N(0, 1) one latent per channel shared by all its positions, e[c, p] independent of
everything with variance v[c, p] - a[c, p]^2. A tensor carries (m, v, a); a = 0 everywhere is
the diagonal PFP. Latents of different channels are taken as independent (cross-channel
covariance is dropped, as in the diagonal PFP).

Ops (formulas in each function's docstring):
  conv_channel   Conv: the loadings go through the mean weights exactly, the weight noise of
                 output channel o (the same at every position) becomes o's new latent; the
                 several latents are projected onto one per channel, keeping the diagonal and
                 the exact pooled variance (sum over all positions) of the shared part.
  relu/clip      loading times E[f'(x)] (Stein's lemma: Cov(f(x), z) = E[f'(x)] Cov(x, z)).
  batch_norm     loading times the channel's scale.
  add            two independent latents per channel projected onto one (pooled sum kept).
  maxpool        Clark's max of correlated inputs, loading by Stein (Phi(al) a1 + Phi(-al) a2).
  global pool    mean of the loadings (coherent) + independent parts / P^2.
  gemm           after Flatten: loadings of the same channel add coherently; output a = 0.

`pfp_covariance(model, variances, inputs, mode)` runs an ONNX graph with mode "none" (the
diagonal reference) or "channel" and returns every tensor's (mean, var).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.special import ndtr

import reference as R

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
LOCAL = False


def _cols(x, kernel, strides, pads, dilations, groups):
    """im2col of NCHW x: [N, G, C/G, kh*kw, L] with L = Ho*Wo output positions."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    win = R._windows(R._pad_hw(x, pt, pl, pb, pr), (kh, kw), (sh, sw), (dh, dw), (ho, wo))
    win = win.reshape(n, groups, c // groups, ho, wo, kh * kw).transpose(0, 1, 2, 5, 3, 4)
    return win.reshape(n, groups, c // groups, kh * kw, ho * wo), (ho, wo)


def project(shared_diag, pooled, axes=(2, 3)):
    """One latent per channel for a shared part with diagonal `shared_diag` d [N, C, ...] and
    pooled variance `pooled` T = Var(sum over positions) [N, C]: loading a = k sqrt(d), the rest
    d - a^2 independent, so that the model's pooled variance (sum_p a)^2 + sum_p (d - a^2) is T:
        k^2 = (T - S2) / (S1^2 - S2),   S1 = sum_p sqrt(d),  S2 = sum_p d,   clipped to [0, 1]
    (k = 0: no more pooled variance than independent positions give; k = 1: fully correlated)."""
    root = np.sqrt(np.maximum(shared_diag, 0.0))
    s1, s2 = root.sum(axis=axes), np.maximum(shared_diag, 0.0).sum(axis=axes)
    span = s1 * s1 - s2
    k2 = np.where(span > 0, (pooled - s2) / np.where(span > 0, span, 1.0), 0.0)
    k = np.sqrt(np.clip(k2, 0.0, 1.0))
    return root * k.reshape(k.shape + (1,) * len(axes))


def conv_channel(m, v, a, wm, wv, bm=None, bv=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1,
                 diagonal_var=False, box=False, box_noise=False, spread_variance=False):
    """Conv y[o, p] = sum_{c,t} w[o,c,t] x[c, p+t] + b[o], w = mu + s eps (eps shared by all p).

        mean      = conv(m, mu) + mu_b
        h[o,c,p]  = sum_t mu[o,c,t] a[c, p+t]                 (input latent z_c through the mean weights)
        shared(p) = sum_c h[o,c,p]^2 + conv(m^2 + v, s2) + s2_b   (latents z_c + weight and bias noise of o)
        indep(p)  = conv(v - a^2, mu^2)
        var       = shared + indep
    Pooled variance of the shared part (sum over the L output positions), exact for the model,
    with window sums M[c,t] = sum_p m[c,p+t], A[c,t] = sum_p a[c,p+t], E[c,t] = sum_p (v-a^2)[c,p+t]:
        pooled[o] = sum_c (sum_t mu[o,c,t] A[c,t])^2 + sum_{c,t} s2[o,c,t] (M^2 + A^2 + E) + L^2 s2_b
    The output loading is project(shared, pooled); the weight-noise part conv(v, s2) of e is
    counted as shared (it is s2 v << s2 m^2 wherever the input is informative).

    ``diagonal_var`` (variant "pooled", no extra multiply-add per MAC): the variance stays the
    diagonal PFP's, var = conv(m^2 + v, s2) + conv(v, mu^2) + s2_b, and shared = conv(m^2 + v, s2) + s2_b;
    the input loadings enter only through the exact pooled variance.

    ``box`` (variant "channel_box", for convolutions with several input channels per group and a
    k x k window, where the coherent term is a nested reduction): h[o,c,p] ~ (sum_t mu[o,c,t]) abar[c,p]
    with abar the window's mean loading, so sum_c h^2 = sum_c (sum_t mu)^2 abar^2 is one reduction.

    ``box_noise`` (what the compiler builds, pfpc/passes/carry_channel_covariance.py): the shared
    part's diagonal that the projection spreads the loading by takes the weight noise in box form,
    sum_c (sum_t s2[o,c,t]) mean_t (m^2 + v)[c,p+t]; the variance and the pooled variance stay exact.

    ``spread_variance`` (what the compiler builds): the loading is spread by the whole output
    variance instead, a = k sqrt(var), with the model's whole pooled variance
    pooled + sum_p indep(p) = pooled + sum_{c,t} mu^2 E: the model's variances and pooled
    variances are the same as with the shared part's diagonal, without computing that diagonal."""
    n, c, h, w = m.shape
    o, cg, kh, kw = wm.shape
    g = groups
    args = ((kh, kw), strides, pads, dilations, g)
    cm, (ho, wo) = _cols(m, *args)
    cv, _ = _cols(v, *args)
    ca, _ = _cols(a, *args)
    mu = wm.reshape(g, o // g, cg, kh * kw)
    s2 = wv.reshape(g, o // g, cg, kh * kw)
    mean = np.einsum("gock,ngckl->ngol", mu, cm)
    if box and cg > 1 and kh * kw > 1:
        h_loading = np.einsum("goc,ngcl->ngocl", mu.sum(-1), ca.mean(-2))
    else:
        h_loading = np.einsum("gock,ngckl->ngocl", mu, ca)
    shared = np.einsum("ngocl->ngol", h_loading**2) + np.einsum("gock,ngckl->ngol", s2, cm**2 + cv)
    indep = np.einsum("gock,ngckl->ngol", mu**2, np.maximum(cv - ca**2, 0.0))
    big_m, big_a, big_e = cm.sum(-1), ca.sum(-1), np.maximum(cv - ca**2, 0.0).sum(-1)
    pooled = np.einsum("ngoc->ngo", np.einsum("gock,ngck->ngoc", mu, big_a) ** 2) + np.einsum("gock,ngck->ngo", s2, big_m**2 + big_a**2 + big_e)
    if LOCAL:  # independent inputs read by overlapping windows: sum_{t,t'} mu_t mu_t' sqrt(E_t E_t')
        pooled = pooled + np.einsum("ngoc->ngo", np.einsum("gock,ngck->ngoc", mu, np.sqrt(big_e)) ** 2) - np.einsum("gock,ngck->ngo", mu**2, big_e)
    length = ho * wo
    if bm is not None:
        mean = mean + bm.reshape(1, g, o // g, 1)
        if bv is not None:
            shared = shared + bv.reshape(1, g, o // g, 1)
            pooled = pooled + length**2 * bv.reshape(1, g, o // g)
    if diagonal_var:
        noise = np.einsum("gock,ngckl->ngol", s2, cm**2 + cv)
        indep = np.einsum("gock,ngckl->ngol", mu**2, cv)
        shared = noise + (0.0 if bv is None or bm is None else bv.reshape(1, g, o // g, 1))
    shape = (n, o, ho, wo)
    shared, indep = shared.reshape(shape), indep.reshape(shape)
    spread = shared
    if box_noise:
        exact_noise = np.einsum("gock,ngckl->ngol", s2, cm**2 + cv).reshape(shape)
        boxed = np.einsum("goc,ngcl->ngol", s2.sum(-1), (cm**2 + cv).mean(-2)).reshape(shape)
        spread = shared - exact_noise + boxed
    if spread_variance:
        pooled_indep = np.einsum("gock,ngck->ngo", mu**2, big_e).reshape(n, o)
        return mean.reshape(shape), shared + indep, project(shared + indep, pooled.reshape(n, o) + pooled_indep)
    loading = project(spread, pooled.reshape(n, o))
    return mean.reshape(shape), shared + indep, loading


def _pdf(x):
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def relu_channel(m, v, a):
    """ReLU: (mean, var) as the diagonal reference; loading a * Phi(m / sqrt(v)) (Stein; not
    clamped to the output's std, as the compiler: within it for |a| <= s)."""
    mean, var = R.relu(m, v)
    s = np.sqrt(v)
    slope = np.where(s > 0, ndtr(m / np.where(s > 0, s, 1.0)), (m > 0).astype(float))
    return mean, var, a * slope


def clip_channel(m, v, a, lower, upper):
    """Clip to [lo, hi]: loading a * (Phi((hi - m)/s) - Phi((lo - m)/s)) = a * P(lo < x < hi)
    (not clamped to the output's std, as the compiler: within it for |a| <= s)."""
    mean, var = R.clip(m, v, lower, upper)
    s = np.sqrt(v)
    safe = np.where(s > 0, s, 1.0)
    lo = -np.inf if lower is None else float(lower)
    hi = np.inf if upper is None else float(upper)
    inside = np.where(s > 0, ndtr((hi - m) / safe) - ndtr((lo - m) / safe), ((m > lo) & (m < hi)).astype(float))
    return mean, var, a * inside


def add_channel(x, y):
    """Sum of two operands whose per-channel latents are independent: diagonal a1^2 + a2^2,
    pooled (sum a1)^2 + (sum a2)^2, projected onto one latent (an operand without latent passes
    the other's through)."""
    (m1, v1, a1), (m2, v2, a2) = x, y
    mean, var = m1 + m2, v1 + v2
    if not np.any(a2):
        return mean, var, np.broadcast_to(a1, mean.shape).copy()
    if not np.any(a1):
        return mean, var, np.broadcast_to(a2, mean.shape).copy()
    axes = tuple(range(2, mean.ndim))
    pooled = a1.sum(axis=axes) ** 2 + a2.sum(axis=axes) ** 2
    return mean, var, project(a1**2 + a2**2, pooled, axes)


def clark_correlated(m1, v1, a1, m2, v2, a2):
    """max(x1, x2) of x1, x2 with covariance a1 a2 (shared latent), Clark (1961):
    th = sqrt(v1 + v2 - 2 a1 a2), al = (m1 - m2) / th,
        E[max]   = m1 Phi(al) + m2 Phi(-al) + th phi(al)
        E[max^2] = (v1 + m1^2) Phi(al) + (v2 + m2^2) Phi(-al) + (m1 + m2) th phi(al)
        loading  = a1 Phi(al) + a2 Phi(-al)                (Stein)
    computed about the larger mean as in reference.clark_max."""
    first = m1 >= m2
    mw, vw, vl = np.where(first, m1, m2), np.where(first, v1, v2), np.where(first, v2, v1)
    aw, al_ = np.where(first, a1, a2), np.where(first, a2, a1)
    d = np.abs(m1 - m2)
    th = np.sqrt(np.maximum(v1 + v2 - 2 * a1 * a2, 0.0))
    ok = th > 1e-300
    z = np.where(ok, np.minimum(d / np.where(ok, th, 1.0), 1e10), np.inf)
    cdf, cdf_neg, pdf = ndtr(z), ndtr(-z), np.where(ok, _pdf(np.where(ok, z, 0.0)), 0.0)
    e1 = -d * cdf_neg + th * pdf
    e2 = vw * cdf + (vl + d * d) * cdf_neg - d * th * pdf
    mean = mw + e1
    var = np.maximum(e2 - e1 * e1, 0.0)
    loading = aw * cdf + al_ * cdf_neg
    return mean, var, np.clip(loading, -np.sqrt(var), np.sqrt(var))


def maxpool_channel(m, v, a, kernel, strides, pads, dilations):
    """MaxPool without padding: pairwise `clark_correlated` in row-major window order."""
    if any(pads):
        raise NotImplementedError("padded MaxPool")
    cols = [_cols(x, kernel, strides, (0, 0, 0, 0), dilations, 1) for x in (m, v, a)]
    (cm, (ho, wo)), (cv, _), (ca, _) = cols
    acc = (cm[..., 0, :], cv[..., 0, :], ca[..., 0, :])
    for t in range(1, cm.shape[-2]):
        acc = clark_correlated(*acc, cm[..., t, :], cv[..., t, :], ca[..., t, :])
    n, c = m.shape[:2]
    return tuple(x.reshape(n, c, ho, wo) for x in acc)


def global_pool_channel(m, v, a):
    """Mean over the P positions of a channel: mean = avg m, loading = avg a (one latent, adds
    coherently), var = loading^2 + sum_p (v - a^2) / P^2."""
    axes = tuple(range(2, m.ndim))
    p = int(np.prod(m.shape[2:]))
    loading = a.mean(axis=axes, keepdims=True)
    indep = np.maximum(v - a**2, 0.0).sum(axis=axes, keepdims=True) / p**2
    return m.mean(axis=axes, keepdims=True), loading**2 + indep, loading


def gemm_channel(m, v, a, group, wm, wv, bm=None, bv=None):
    """Dense y = W x + b (W [out, in]) on an input whose element i loads on latent group[i]:
        var = sum_g (sum_{i in g} mu_ki a_i)^2 + sum_i mu_ki^2 (v_i - a_i^2) + sum_i s2_ki (m_i^2 + v_i) + s2_b
    (the loadings of one latent add coherently); the outputs carry no latent (a = 0)."""
    mean = m @ wm.T
    groups = int(group.max()) + 1
    onehot = np.zeros((m.shape[1], groups))
    onehot[np.arange(m.shape[1]), group] = 1.0
    coherent = np.einsum("ki,ni,ig->nkg", wm, a, onehot)
    var = (coherent**2).sum(-1) + np.maximum(v - a**2, 0.0) @ (wm**2).T + (m**2 + v) @ wv.T
    if bm is not None:
        mean = mean + bm
        var = var + (0.0 if bv is None else bv)
    return mean, var, np.zeros_like(mean)


def pfp_covariance(model: onnx.ModelProto, variances: dict, inputs: dict, mode: str = "channel",
                   replace: dict | None = None, pools_before_relus: bool = True, start: int = 0,
                   box_noise: bool = False, spread_variance: bool = False, max_keeps_loading: bool = True,
                   loaded: set | None = None, loadings: dict | None = None) -> dict:
    """Run the PFP over ``model`` (constants folded, batch norms kept) and return every tensor's
    (mean, var). mode "none": the diagonal reference (tests/reference.py); "channel": shared
    per-channel latents; "pooled": the same with the diagonal PFP's variance at every conv
    (the loadings only enter pooled variances, see conv_channel). ``replace``: {tensor: (mean, var)} read instead of the computed
    moments when a node consumes that tensor (loadings 0), to feed e.g. Monte Carlo marginals.
    ``pools_before_relus``: ReLU -> MaxPool computed as MaxPool -> ReLU, as pfpc does.
    ``start``: the convolutions before the start-th (in graph order) give their outputs no
    loading (the cheaper settings of the trade-off curve: only the last layers carry loadings).
    ``max_keeps_loading=False`` (what the compiler builds): a MaxPool reads its input's loadings
    (`reference.maxpool2d_correlated`) and its output carries none; ``"compiled"``: and passes the
    maximum's loading on (what the compiler builds where a mean over positions follows).
    ``loaded``: the convolutions (by output name) that give their outputs a loading, the others
    none (a compiled plan); None: every one from the start-th on.
    ``loadings``: a dict to fill with every tensor's loading (the returned dict has none)."""
    env = {}
    group = {}  # latent channel of each feature of a flattened tensor
    convs = [0]
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        mean = value.astype(np.float64) if value.dtype.kind == "f" else value
        var = variances.get(init.name)
        var = np.zeros(mean.shape) if var is None else np.asarray(var, np.float64)
        env[init.name] = (mean, var, np.zeros(mean.shape))
    for inp in model.graph.input:
        if inp.name not in env:
            value = np.asarray(inputs[inp.name], np.float64)
            env[inp.name] = (value, np.zeros(value.shape), np.zeros(value.shape))
    replace = replace or {}
    outputs = {o.name for o in model.graph.output}
    nodes = R._gated_products(model.graph.node)
    nodes = R._pools_before_relus(nodes, outputs) if pools_before_relus else nodes
    for node in nodes:
        x = []
        for name in node.input:
            if not name:
                x.append(None)
            elif name in replace:
                rm, rv = replace[name]
                x.append((np.asarray(rm, np.float64), np.asarray(rv, np.float64), np.zeros(np.shape(rm))))
            else:
                x.append(env[name])
        out = _node(node, x, mode, group, box_noise, spread_variance, max_keeps_loading)
        if node.op_type == "Conv" and mode != "none":
            if convs[0] < start or (loaded is not None and node.output[0] not in loaded):
                out = (out[0], out[1], np.zeros(out[0].shape))
            convs[0] += 1
        env[node.output[0]] = out
    if loadings is not None:
        loadings.update({name: a for name, (_, _, a) in env.items()})
    return {name: (m, v) for name, (m, v, _) in env.items()}


def _lift(t):
    return tuple(z[:, :, None, :] for z in t)


_SMOOTH = {"SiLU": "silu", "Gelu": "gelu", "Softplus": "softplus", "Elu": "elu", "Selu": "selu"}


def activation_loading(op, a, m, v, ld, slope=None):
    """The output loading a E[f'(x)] of an activation other than ReLU and Clip (Stein's lemma)."""
    if op == "LeakyRelu":
        return R.leaky_relu_loading(m, v, ld, a.get("alpha", 0.01))
    if op == "PRelu":
        return R.leaky_relu_loading(m, v, ld, slope)
    if op == "Sigmoid":
        return R.sigmoid_loading(m, v, ld)
    if op == "Tanh":
        return R.tanh_loading(m, v, ld)
    if op == "HardSigmoid":
        return R.hard_sigmoid_loading(m, v, ld, a.get("alpha", 0.2), a.get("beta", 0.5))
    if op in ("HardSwish", "HardSwishOf"):
        return R.hard_swish_loading(m, v, ld, a.get("alpha", 1 / 6), a.get("beta", 0.5))
    return R.smooth_loading(R.SMOOTH_FUNCTIONS[_SMOOTH[op]](a), m, v, ld)


ACTIVATIONS = {"LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "HardSwishOf", *_SMOOTH}


def _node(node, x, mode, group, box_noise=False, spread_variance=False, max_keeps_loading=True):
    op = node.op_type
    a = R._attrs(node)
    if mode != "none" and op in ACTIVATIONS:
        (mean, var), = R._node_outputs(node, a, [(t[0], t[1]) for t in x])
        return mean, var, activation_loading(op, a, x[0][0], x[0][1], x[0][2], x[1][0] if op == "PRelu" else None)
    if mode == "none" or op not in CHANNEL_OPS:
        outs = R._node_outputs(node, a, [None if t is None else (t[0], t[1]) for t in x])
        mean, var = outs[0]
        if op in ("Flatten", "Reshape") and x[0][0].ndim >= 3:
            loading = x[0][2].reshape(mean.shape)
            c = x[0][0].shape[1]
            group[node.output[0]] = np.repeat(np.arange(c), int(np.prod(x[0][0].shape[2:])))
            return mean, var, loading
        if op in ("Identity", "Dropout"):
            return mean, var, x[0][2]
        if op == "BatchNormalization":
            scale = x[1][0] / np.sqrt(x[4][0] + a.get("epsilon", 1e-5))
            shape = [1] * mean.ndim
            shape[1] = -1
            return mean, var, x[0][2] * scale.reshape(shape)
        if op == "Pad" and mode != "none":
            pads = x[1][0].astype(int)
            rank = mean.ndim
            loading = np.pad(x[0][2], list(zip(pads[:rank], pads[rank:])))
            return mean, var, loading
        if op in ("Flatten", "Reshape"):
            return mean, var, x[0][2].reshape(mean.shape)
        return mean, var, np.zeros(mean.shape)
    m, v, ld = x[0]
    if op == "Conv":
        one_d = m.ndim == 3
        if one_d:
            (m, v, ld), weight = _lift(x[0]), _lift(x[1])
            attrs = R._lift_attrs_1d(a)
        else:
            weight, attrs = x[1], a
        _, strides, pads, dil = R._pool_geometry(attrs, m.shape[2:], weight[0].shape[2:])
        b = x[2] if len(x) > 2 and x[2] is not None else (None, None, None)
        out = conv_channel(m, v, ld, weight[0], weight[1], b[0], b[1], strides, pads, dil, a.get("group", 1),
                           diagonal_var=mode == "pooled", box=mode == "channel_box", box_noise=box_noise,
                           spread_variance=spread_variance)
        return tuple(z[:, :, 0, :] for z in out) if one_d else out
    if op == "Relu":
        return relu_channel(m, v, ld)
    if op == "Clip":
        lower = x[1][0] if len(x) > 1 and x[1] is not None else a.get("min")
        upper = x[2][0] if len(x) > 2 and x[2] is not None else a.get("max")
        return clip_channel(m, v, ld, lower, upper)
    if op == "Add":
        return add_channel(x[0], x[1])
    if op == "MaxPool":
        kernel, strides, pads, dil = R._pool_geometry(a, m.shape[2:])
        if max_keeps_loading == "compiled":  # as the compiler passes it on to a mean over positions
            return R._maxpool2d_correlated(m, v, ld, kernel, strides, pads, dil, a.get("ceil_mode", 0))
        if not max_keeps_loading:
            mean, var = R.maxpool2d_correlated(m, v, ld, kernel, strides, pads, dil, a.get("ceil_mode", 0))
            return mean, var, np.zeros(mean.shape)
        return maxpool_channel(m, v, ld, kernel, strides, pads, dil)
    if op in ("GlobalAveragePool", "AveragePool"):
        if op == "AveragePool":
            kernel, strides, pads, dil = R._pool_geometry(a, m.shape[2:])
            if tuple(kernel) != tuple(m.shape[2:]) or any(pads):
                raise NotImplementedError("AveragePool other than global")
        return global_pool_channel(m, v, ld)
    if op == "Gemm":
        if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise NotImplementedError("Gemm other than x W^T + b")
        g = group.get(node.input[0], np.arange(m.shape[1]))
        b = x[2] if len(x) > 2 and x[2] is not None else (None, None, None)
        return gemm_channel(m, v, ld, g, x[1][0], x[1][1], b[0], b[1])
    raise NotImplementedError(op)


CHANNEL_OPS = {"Conv", "Relu", "Clip", "Add", "MaxPool", "GlobalAveragePool", "AveragePool", "Gemm"}
