"""Float64 prototypes for the seed LeNet-5's heavy-tailed dense tail on Fashion-MNIST (imports
tests/reference.py and tests/reference_covariance.py; measured by benchmarks/nongauss_lenet.py,
docs/covariance.md "The seed LeNet-5 on Fashion-MNIST").

Why: the dense pre-activations are heavy-tailed and mostly far below the ReLU's kink, so a Gaussian
with the exact mean and variance puts too little mass above zero (the last ReLU keeps 28 % of MC's
variance). Two propagations:

1. The fourth moment carried under the PFP's independence assumption (measured: not enough).
   - dense u = sum_j w_j h_j + b (w ~ N(mu, s2), b ~ N(mu_b, s2_b), all independent): one term
     t = w h has raw moments E[t^k] = E[w^k] E[h^k], k = 1..4, with
         E[w] = mu, E[w^2] = mu^2 + s2, E[w^3] = mu^3 + 3 mu s2, E[w^4] = mu^4 + 6 mu^2 s2 + 3 s2^2;
     its cumulants k2 = m2 - m1^2, k4 = m4 - 4 m3 m1 - 3 m2^2 + 12 m2 m1^2 - 6 m1^4 add over j (the
     Gaussian bias adds k2 only); u carries (mean, var = k2, fourth central moment = k4 + 3 k2^2).
   - ReLU of u with kurtosis K = mu4 / v^2: u taken as a two-component scale mixture of Gaussians
     with the same mean, m + sqrt(lam v) eps, E[lam] = 1, Var[lam] = r = K / 3 - 1 (`mixture`:
     p = 1/2, lam = 1 -+ sqrt(r) while r <= 1, else lam1 = 0, p = r / (1 + r)); its raw moments
     are the components' by the truncated-normal recursion (`relu_raw_moments`):
         I0 = Phi(z), I1 = m Phi + s phi, I_k = m I_{k-1} + (k - 1) s^2 I_{k-2} (k >= 2), z = m / s.

2. One scale shared by all of fc1's units in two scenarios (`lenet_scale_mixture`, the one that
   reaches the target): the tails come from the conv2 weight noise moving the whole feature
   vector's energy, which every fc1 unit's noise variance reads; see its docstring.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def relu_raw_moments(mean, var):
    """E[relu(x)^k], k = 1..4, for x ~ N(mean, var) (truncated-normal recursion, module docstring)."""
    m = np.asarray(mean, np.float64)
    v = np.maximum(np.asarray(var, np.float64), 0.0)
    s = np.sqrt(v)
    positive = s > 0
    z = np.where(positive, m / np.where(positive, s, 1.0), 0.0)
    cdf = np.where(positive, ndtr(z), (m > 0).astype(np.float64))
    pdf = np.where(positive, _INV_SQRT_2PI * np.exp(-0.5 * z * z), 0.0)
    i1 = m * cdf + s * pdf
    i2 = m * i1 + v * cdf
    i3 = m * i2 + 2 * v * i1
    i4 = m * i3 + 3 * v * i2
    return [np.maximum(i, 0.0) for i in (i1, i2, i3, i4)]


def mixture(var, fourth):
    """Two-component scale mixture with variance `var` and fourth central moment `fourth`:
    (p, var1, var2) with p the first component's probability (module docstring)."""
    v = np.asarray(var, np.float64)
    kurtosis = np.where(v > 0, np.asarray(fourth, np.float64) / np.maximum(v * v, 1e-300), 3.0)
    r = np.maximum(kurtosis / 3.0 - 1.0, 0.0)
    p = np.where(r <= 1.0, 0.5, r / (1.0 + r))
    lam1 = 1.0 - np.sqrt(r * (1.0 - p) / p)
    lam2 = 1.0 + np.sqrt(r * p / (1.0 - p))
    return p, np.maximum(lam1, 0.0) * v, lam2 * v


def relu_fourth(mean, var, fourth=None):
    """Raw moments E[relu(u)^k], k = 1..4, of u with (mean, var, fourth central moment), u taken
    as the scale mixture of `mixture` (fourth None: Gaussian)."""
    if fourth is None:
        return relu_raw_moments(mean, var)
    p, var1, var2 = mixture(var, fourth)
    first, second = relu_raw_moments(mean, var1), relu_raw_moments(mean, var2)
    return [p * a + (1.0 - p) * b for a, b in zip(first, second)]


def dense_fourth(raw, w_mean, w_var, b_mean, b_var, exact_k4=True):
    """Dense u = W h + b (W [out, in]) of independent inputs with raw moments raw = [E h, .., E h^4]
    (arrays [batch, in]): returns (mean, var, fourth central moment) of u (module docstring).
    exact_k4=False drops the weights' means from k4, k4 = sum_j 3 s2^2 (E[h^4] - E[h^2]^2): one
    extra matrix product instead of five, for |mu| << s."""
    mu, s2 = np.asarray(w_mean, np.float64), np.asarray(w_var, np.float64)
    h1, h2, h3, h4 = raw
    w1, w2 = mu, mu * mu + s2
    w3, w4 = mu**3 + 3 * mu * s2, mu**4 + 6 * mu * mu * s2 + 3 * s2 * s2
    mean = h1 @ w1.T + b_mean
    var = h2 @ w2.T - (h1 * h1) @ (w1 * w1).T + b_var
    if exact_k4:
        k4 = (h4 @ w4.T - 4 * (h3 * h1) @ (w3 * w1).T - 3 * (h2 * h2) @ (w2 * w2).T
              + 12 * (h2 * h1 * h1) @ (w2 * w1 * w1).T - 6 * (h1**4) @ (w1**4).T)
    else:
        k4 = 3 * (h4 - h2 * h2) @ (s2 * s2).T
    var = np.maximum(var, 0.0)
    return mean, var, np.maximum(k4 + 3 * var * var, 0.0)


def dense_tail_fourth(weights, variances, layers, raw, exact_k4=True, mixture_relu=True):
    """The dense layers `layers` (names; ReLU between, none after the last) from the inputs' raw
    moments, carrying the fourth moment; returns the last layer's (mean, var, fourth)."""
    for index, name in enumerate(layers):
        mean, var, fourth = dense_fourth(raw, weights[f"{name}.weight"], variances[f"{name}.weight"],
                                         weights[f"{name}.bias"], variances[f"{name}.bias"], exact_k4)
        if index + 1 < len(layers):
            raw = relu_fourth(mean, var, fourth if mixture_relu else None)
    return mean, var, fourth


def lenet_fourth(model, variances, images, exact_k4=True, mixture_relu=True, env=None):
    """The seed LeNet-5 (conv, ReLU, max-pool twice, fc1-fc3): the diagonal PFP up to the second
    max-pool (Clark; tests/reference.py, ReLU after the max-pool as pfpc computes it), then the
    fourth-moment dense tail. Returns (mean, var) of the logits."""
    import reference as R
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    if env is None:
        import reference_covariance as RC

        env = RC.pfp_covariance(model, variances, {model.graph.input[0].name: images}, "none")
    conv_mean, conv_var = env["/conv2/Conv_output_0"][:2]
    pooled_mean, pooled_var = R.maxpool2d(conv_mean, conv_var, (2, 2), (2, 2))
    raw = [r.reshape(len(images), -1) for r in relu_raw_moments(pooled_mean, pooled_var)]
    mean, var, _ = dense_tail_fourth(weights, variances, ["fc1", "fc2", "fc3"], raw, exact_k4, mixture_relu)
    return mean, var




def two_point_scale(kappa):
    """Two scenarios (p, lam) of a scale lam with E[lam] = 1 and Var[lam] = kappa (the `mixture`
    rule: p = 1/2, lam = 1 -+ sqrt(kappa) while kappa <= 1, else lam1 = 0, p = kappa / (1 + kappa))."""
    r = np.maximum(np.asarray(kappa, np.float64), 0.0)
    p = np.where(r <= 1.0, 0.5, r / (1.0 + r))
    return [(p, np.maximum(1.0 - np.sqrt(r * (1.0 - p) / p), 0.0)), (1.0 - p, 1.0 + np.sqrt(r * p / (1.0 - p)))]


def feature_scale_variance(mean, var, loading, alpha, nodes=5):
    """Var(sum_i alpha_i relu(y_i)^2) for pre-activations y [N, C, ...] with one latent per channel,
    y_i = mean_i + loading_i z_c + e_i, e_i ~ N(0, var_i - loading_i^2) independent, z_c ~ N(0, 1)
    independent across channels; alpha [N, C * ...]. With G_i(z) = E[relu(y_i)^2 | z] and
    F_i(z) = E[relu(y_i)^4 | z] (relu_raw_moments) at the `nodes` Gauss-Hermite nodes z_q
    (weights w_q):
        Var = sum_c Var_z(sum_{i in c} alpha_i G_i(z)) + sum_i alpha_i^2 E_z[F_i(z) - G_i(z)^2]."""
    n, c = mean.shape[:2]
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    alpha = np.asarray(alpha, np.float64).reshape(n, c, -1)
    independent = np.maximum(var - loading * loading, 0.0).reshape(n, c, -1)
    mean, loading = mean.reshape(n, c, -1), loading.reshape(n, c, -1)
    first = second = indep = 0.0
    for node, weight in zip(z, w):
        _, g, _, f = relu_raw_moments(mean + loading * node, independent)
        channel_sum = (alpha * g).sum(-1)
        first = first + weight * channel_sum
        second = second + weight * channel_sum**2
        indep = indep + weight * (alpha * alpha * (f - g * g)).sum(-1)
    return (np.maximum(second - first * first, 0.0) + indep).sum(-1)


def lenet_scale_mixture(model, variances, images, nodes=5, kappa=None, base_env=None, start=1, alpha="exact"):
    """The seed LeNet-5 with the diagonal PFP everywhere except that fc1's pre-activations share
    one random scale lam (two scenarios, `two_point_scale`): the dense tail after fc1 runs once per
    scenario (fc1's variance times lam) and the logits are the scenarios' mixture,
        mean = sum_k p_k m_k,  var = sum_k p_k (v_k + m_k^2) - mean^2.
    kappa = Var(lam) per image: the variance of fc1's average relative noise variance
    g = (1/J) sum_j c_j / E[c_j], c_j = sum_i s2_ji x_i^2 + s2_bj (the noise variance of unit j
    given the features x), i.e. g - 1 = sum_i alpha_i (x_i^2 - E x_i^2), alpha_i = (1/J) sum_j
    s2_ji / E[c_j]; Var(g) by `feature_scale_variance` on the second max-pool's pre-activations
    with the per-channel latents of tests/reference_covariance.py ("channel": the convolutions'
    shared weight noise; `start`: the first convolution with loadings, 1 = conv2 only).
    alpha="column": alpha_i = mean_j s2_ji / mean_j E[c_j] (a constant vector over one scalar:
    no pass over fc1's weights; exact when all units' E[c_j] are equal). Returns (mean, var, kappa)."""
    import reference as R
    import reference_covariance as RC
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    feed = {model.graph.input[0].name: images}
    env = base_env or RC.pfp_covariance(model, variances, feed, "none")
    n = len(images)
    if kappa is None:
        loadings = {}
        channel = RC.pfp_covariance(model, variances, feed, "channel", loadings=loadings, start=start)
        conv = "/conv2/Conv_output_0"
        pre = RC.maxpool_channel(*channel[conv], loadings[conv], (2, 2), (2, 2), (0, 0, 0, 0), (1, 1))
        x_mean, x_var = (t.reshape(n, -1) for t in env["/Flatten_output_0"])
        s2, s2_bias = variances["fc1.weight"], variances["fc1.bias"]
        noise = (x_mean**2 + x_var) @ s2.T + s2_bias  # E[c_j]: fc1's s2 accumulator, kept apart
        if alpha == "exact":
            weight = (1.0 / noise) @ s2 / s2.shape[0]
        else:
            weight = s2.mean(0)[None] / noise.mean(-1, keepdims=True)
        kappa = feature_scale_variance(*pre, weight, nodes)
    fc1_mean, fc1_var = env["/fc1/Gemm_output_0"]
    mixed_mean = mixed_second = 0.0
    for p, lam in two_point_scale(kappa):
        mean, var = fc1_mean, fc1_var * lam[:, None]
        for name in ("fc2", "fc3"):
            mean, var = R.relu(mean, var)
            mean, var = R.linear(mean, var, weights[f"{name}.weight"], variances[f"{name}.weight"],
                                 weights[f"{name}.bias"], variances[f"{name}.bias"])
        mixed_mean = mixed_mean + p[:, None] * mean
        mixed_second = mixed_second + p[:, None] * (var + mean * mean)
    return mixed_mean, np.maximum(mixed_second - mixed_mean**2, 0.0), kappa


def variants(model, variances, images):
    """The prototypes benchmarks/nongauss_lenet.py compares with Monte Carlo: {name: (mean, var)}."""
    import reference_covariance as RC

    env = RC.pfp_covariance(model, variances, {model.graph.input[0].name: images}, "none")
    result = {"fourth moment, exact k4": lenet_fourth(model, variances, images, True, True, env),
              "fourth moment, k4 without weight means": lenet_fourth(model, variances, images, False, True, env),
              "check: raw moments, Gaussian ReLU (= diagonal)": lenet_fourth(model, variances, images, True, False, env)}
    for nodes in (3, 4, 5, 7):
        result[f"shared fc1 scale, {nodes} nodes"] = lenet_scale_mixture(model, variances, images, nodes, base_env=env)[:2]
    result["shared fc1 scale, 5 nodes, loadings from conv1"] = lenet_scale_mixture(model, variances, images, 5, base_env=env, start=0)[:2]
    for nodes in (5, 7):
        result[f"shared fc1 scale, {nodes} nodes, column alpha"] = lenet_scale_mixture(model, variances, images, nodes, base_env=env, alpha="column")[:2]
    return result


def scale_mixture(model, variances, images, conv, dense, pool=None, nodes=5, compiled=True, scenarios=None, means="diagonal"):
    """`lenet_scale_mixture` for any network of that layout, by tensor names: ``conv`` the output of
    the convolution whose per-channel loadings predict kappa, ``pool`` the max-pool after it
    ((kernel, strides, pads, dilations) or None: the ReLU reads the convolution), ``dense`` the
    output of the noise-dominated dense layer (a Gemm, bias included). The features are the
    ReLU of the pool (or conv), flattened into the Gemm; the layers after ``dense`` run per
    scenario by the diagonal reference (`reference_covariance.pfp_covariance` with the dense
    output replaced), the graph outputs mixed. ``compiled``: the loadings as the compiler makes
    them (the shared weight noise in box form, spread by the output variance). ``scenarios``:
    kappa -> [(p, lam)] (default `two_point_scale`). ``means``: "diagonal" (the outputs' means are
    the diagonal PFP's, as the compiler keeps them) or "mixture" (sum p m). The variance is the
    mixture's either way. Returns ({output: (mean, var)}, kappa)."""
    import reference_covariance as RC
    from onnx import numpy_helper

    feed = {model.graph.input[0].name: images}
    env = RC.pfp_covariance(model, variances, feed, "none")
    loadings = {}
    channel = RC.pfp_covariance(model, variances, feed, "channel", loadings=loadings, loaded={conv}, box_noise=compiled,
                                spread_variance=compiled)
    pre = channel[conv] + (loadings[conv],) if pool is None else RC.maxpool_channel(*channel[conv], loadings[conv], *pool)
    node = next(n for n in model.graph.node if n.output[0] == dense)
    attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
    s2 = np.asarray(variances[node.input[1]], np.float64)
    s2 = s2 if attrs.get("transB", 0) else s2.T  # [out, in]
    s2_bias = np.asarray(variances.get(node.input[2], np.zeros(s2.shape[0])), np.float64) if len(node.input) > 2 else 0.0
    n = len(images)
    x_mean, x_var = (t.reshape(n, -1) for t in env[node.input[0]])
    noise = (x_mean**2 + x_var) @ s2.T + s2_bias
    alpha = np.where(noise > 0, 1.0 / np.where(noise > 0, noise, 1.0), 0.0) @ s2 / s2.shape[0]
    kappa = feature_scale_variance(*(np.asarray(t, np.float64) for t in pre), alpha, nodes)
    dense_mean, dense_var = env[dense]
    mixed = {}
    for p, lam in (scenarios or two_point_scale)(kappa):
        scaled = dense_var * lam.reshape((n,) + (1,) * (dense_var.ndim - 1))
        outputs = RC.pfp_covariance(model, variances, feed, "none", replace={dense: (dense_mean, scaled)})
        for out in model.graph.output:
            mean, var = outputs[out.name]
            weight = p.reshape((n,) + (1,) * (mean.ndim - 1))
            first, second = mixed.get(out.name, (0.0, 0.0))
            mixed[out.name] = (first + weight * mean, second + weight * (var + mean * mean))
    if means not in ("diagonal", "mixture"):
        raise ValueError(f"means={means!r}")
    return {name: (env[name][0] if means == "diagonal" else first, np.maximum(second - first**2, 0.0))
            for name, (first, second) in mixed.items()}, kappa
