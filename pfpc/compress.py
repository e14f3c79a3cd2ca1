"""``pfpc compress``: a full Gaussian posterior -> a shared posterior (`frontends.shared_posterior`).

Every weight's posterior N(mu, sigma^2) is a point (mu, sigma). Between 1-D Gaussians the
Wasserstein-2 distance is W2^2 = (mu_1 - mu_2)^2 + (sigma_1 - sigma_2)^2, the Euclidean distance
of the points, and the W2 barycentre of a set is the Gaussian at their mean point: k-means in
(mu, sigma) therefore minimises the mean squared W2 distortion of replacing every weight by its
component. Steps, per initializer (``per_layer``) or over all of them at once (``global``):

1. clustering: scikit-learn KMeans (``random_state`` fixed, so the result is deterministic) with
   ``components`` clusters, or the smallest count whose RMS W2 distortion is at most ``max_w2``;
   ``gmm`` clusters with a Gaussian mixture instead (components at its means);
2. merging: two components closer than ``merge_w2`` become one, by moment matching of the two
   (weighted by their member counts): mu = sum n_i mu_i / n, sigma^2 = sum n_i (sigma_i^2 + mu_i^2) / n - mu^2;
3. outliers: the ``outliers`` fraction of weights with the largest W2 distance to their component
   keeps its own (mu, sigma) as an exception.

4. blends (``blend_gain`` G): a weight whose point lies between its component c1 and another c2
   gets the blend (c1, c2, alpha) of the format, mu = alpha mu_1 + (1 - alpha) mu_2 and
   sigma = alpha sigma_1 + (1 - alpha) sigma_2 (the W2 geodesic between the two Gaussians, a
   segment in (mu, sigma)): alpha projects the point onto the segment (least W2), over every c2;
   the weight is blended when that reduces its W2 error by more than the fraction G;
   ``blend_levels`` L rounds alpha to a multiple of 1/L, so that blended weights share entries.

``channel_scale`` fits a per-output-channel scale s_c (axis 0; mean s mu, std s sigma, as batch-
norm folding scales a layer) before clustering: each channel's points are divided by their RMS,
clustered, then scales and components are refitted by alternating least squares in (mu, sigma)
(`refit_scales`); components, blends and exceptions live in the scaled space.

``precision_weighted`` gives k-means a weight 1/sigma^2 per point: the distortion of a weight
counts relative to its posterior uncertainty, so the few well-determined weights (small sigma),
which decide the predictions, are placed more exactly than the many near the prior. On the LeNet
example this is what keeps accuracy and calibration with 15 components (docs/shared_posterior.md).

Initializers smaller than ``min_size`` weights, and deterministic ones, are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PfpcError
from .frontends.shared_posterior import SharedPosterior, SharedTensor, expand_tensor

MAX_COMPONENTS = 65536
SEED = 0


@dataclass
class Options:
    components: int | None = 16
    max_w2: float | None = None
    per_layer: bool = True
    outliers: float = 0.0
    gmm: bool = False
    merge_w2: float = 0.0
    min_size: int = 64
    precision_weighted: bool = False
    blend_gain: float | None = None
    blend_levels: int = 0
    channel_scale: bool = False


def w2(mu_a, sigma_a, mu_b, sigma_b):
    """Wasserstein-2 distance between N(mu_a, sigma_a^2) and N(mu_b, sigma_b^2), element-wise."""
    return np.sqrt((np.asarray(mu_a, np.float64) - mu_b) ** 2 + (np.asarray(sigma_a, np.float64) - sigma_b) ** 2)


def check_options(options: Options) -> None:
    if (options.components is None) == (options.max_w2 is None):
        raise PfpcError("compress: give exactly one of --components K and --max-w2 EPS")
    if options.components is not None and not 1 <= options.components <= MAX_COMPONENTS:
        raise PfpcError(f"--components must be in [1, {MAX_COMPONENTS}], not {options.components}")
    if options.max_w2 is not None and not options.max_w2 > 0:
        raise PfpcError(f"--max-w2 must be positive, not {options.max_w2}")
    if not 0 <= options.outliers < 1:
        raise PfpcError(f"--outliers must be a fraction in [0, 1), not {options.outliers}")
    if options.merge_w2 < 0:
        raise PfpcError(f"--merge-w2 must be >= 0, not {options.merge_w2}")
    if options.blend_levels < 0 or (options.blend_levels and options.blend_gain is None):
        raise PfpcError("--blend-levels L needs --blend and L >= 1")
    if options.blend_gain is not None and not 0 < options.blend_gain < 1:
        raise PfpcError(f"--blend must be a fraction in (0, 1) of the W2 error a blend removes, not {options.blend_gain}")
    if options.channel_scale and not options.per_layer:
        raise PfpcError("--channel-scale refits every tensor's components with its scales: it needs --per-layer codebooks")
    if options.gmm and options.precision_weighted:
        raise PfpcError("--precision-weighted applies to k-means; scikit-learn's Gaussian mixture takes no sample weights")


def cluster(points: np.ndarray, count: int, gmm: bool = False, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(centres [K, 2], label per point); K <= count (never more than the distinct points).
    ``weights``: per point, for k-means (the centres become weighted means)."""
    distinct = np.unique(points, axis=0).shape[0]
    count = max(1, min(count, distinct))
    if gmm:
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=count, covariance_type="full", random_state=SEED, reg_covar=1e-9).fit(points)
        labels = model.predict(points)
        centres = model.means_
    else:
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=count, n_init=4, random_state=SEED).fit(points, sample_weight=weights)
        labels, centres = model.labels_, model.cluster_centers_
    used, labels = np.unique(labels, return_inverse=True)  # drop empty components
    return np.asarray(centres, np.float64)[used], labels.reshape(-1)


def merge(centres, labels, threshold):
    """Merge the closest pair of components while it is closer than ``threshold`` (W2), by moment matching."""
    centres, labels = centres.copy(), labels.copy()
    counts = np.bincount(labels, minlength=len(centres)).astype(np.float64)
    while len(centres) > 1 and threshold > 0:
        distance = w2(centres[:, None, 0], centres[:, None, 1], centres[None, :, 0], centres[None, :, 1])
        np.fill_diagonal(distance, np.inf)
        a, b = np.unravel_index(np.argmin(distance), distance.shape)
        if distance[a, b] >= threshold:
            break
        n = counts[a] + counts[b]
        mu = (counts[a] * centres[a, 0] + counts[b] * centres[b, 0]) / n
        second = (counts[a] * (centres[a, 1] ** 2 + centres[a, 0] ** 2) + counts[b] * (centres[b, 1] ** 2 + centres[b, 0] ** 2)) / n
        centres[a] = mu, np.sqrt(max(second - mu * mu, 0.0))
        counts[a] = n
        labels[labels == b] = a
        keep = np.arange(len(centres)) != b
        centres, counts = centres[keep], counts[keep]
        labels[labels > b] -= 1
    return centres, labels


def rms_w2(points, centres, labels) -> float:
    return float(np.sqrt(np.mean(np.sum((points - centres[labels]) ** 2, axis=1))))


def point_weights(points: np.ndarray, options: Options):
    """k-means' sample weights: 1/sigma^2 with ``precision_weighted``, else None (all equal)."""
    return 1.0 / np.maximum(points[:, 1], 1e-3) ** 2 if options.precision_weighted else None


def fit(points: np.ndarray, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """Components and labels for ``points`` [N, 2]: a fixed count, or the smallest meeting ``max_w2``."""
    weights = point_weights(points, options)
    if options.components is not None:
        centres, labels = cluster(points, options.components, options.gmm, weights)
    else:
        low, high = 1, 1
        while True:  # doubling, then bisection on the component count
            centres, labels = cluster(points, high, options.gmm, weights)
            if rms_w2(points, centres, labels) <= options.max_w2 or len(centres) < high or high >= MAX_COMPONENTS:
                break
            low, high = high + 1, min(2 * high, MAX_COMPONENTS)
        while low < high:
            middle = (low + high) // 2
            trial = cluster(points, middle, options.gmm, weights)
            if rms_w2(points, *trial) <= options.max_w2:
                high, (centres, labels) = middle, trial
            else:
                low = middle + 1
    return merge(centres, labels, options.merge_w2)


def compress_posterior(model, posterior, options: Options) -> tuple[SharedPosterior, list]:
    """Compress a bound `Posterior` of ``model`` (ONNX); mean overrides of the tensors left as
    they are are kept (``<name>.mean``)."""
    from onnx import numpy_helper

    stds = {name: np.sqrt(var.astype(np.float64)).astype(np.float32) for name, var in posterior.variances.items()}
    shared, rows = compress(posterior.means, stds, options)
    for init in model.graph.initializer:
        name = init.name
        if name in posterior.means and name not in shared.tensors and not np.array_equal(posterior.means[name], numpy_helper.to_array(init)):
            shared.rest[f"{name}.mean"] = posterior.means[name]
    return shared, rows


def compress(means: dict, stds: dict, options: Options) -> tuple[SharedPosterior, list]:
    """Compress ``stds`` (initializer -> posterior std; ``means``: initializer -> mean).

    Returns the shared posterior and one report row per covered initializer."""
    check_options(options)
    covered = [name for name in sorted(stds) if stds[name].size >= options.min_size]
    if not covered:
        raise PfpcError(f"compress: no stochastic initializer has at least {options.min_size} weights")
    points = {name: np.stack([means[name].astype(np.float64).reshape(-1), stds[name].astype(np.float64).reshape(-1)], axis=1)
              for name in covered}
    scales = {name: channel_rms(points[name], means[name].shape) for name in covered
              if options.channel_scale and means[name].ndim >= 2}
    scaled = {name: points[name] / _per_point(scales[name], means[name].shape) if name in scales else points[name] for name in covered}
    fitted = {}
    if options.per_layer:
        for name in covered:
            fitted[name] = fit(scaled[name], options)
    else:
        centres, labels = fit(np.concatenate([scaled[name] for name in covered]), options)
        offsets = np.cumsum([0] + [points[name].shape[0] for name in covered])
        for i, name in enumerate(covered):
            fitted[name] = centres, labels[offsets[i] : offsets[i + 1]]
    tensors = {}
    for name in covered:
        centres, labels = fitted[name]
        if name in scales:
            scales[name], centres, labels = refit_scales(points[name], means[name].shape, centres, labels, point_weights(scaled[name], options))
            scaled[name] = points[name] / _per_point(scales[name], means[name].shape)
        shared = SharedTensor(
            tuple(means[name].shape), centres[:, 0].astype(np.float32), centres[:, 1].astype(np.float32),
            labels.reshape(means[name].shape).astype(np.uint8 if len(centres) <= 256 else np.uint16),
        )
        if name in scales:
            shared.channel_scale, shared.channel_axis = scales[name].astype(np.float32), 0
        # distortion (in the scaled space) after float32 rounding of the components
        components = np.stack([shared.component_mean, shared.component_std], axis=1).astype(np.float64)
        distortion = w2(scaled[name][:, 0], scaled[name][:, 1], components[labels, 0], components[labels, 1])
        if options.blend_gain is not None:
            distortion = add_blends(shared, scaled[name], components, labels, distortion, options.blend_gain, options.blend_levels)
        outliers = int(np.floor(options.outliers * labels.size))
        if outliers:
            position = np.sort(np.argsort(-distortion, kind="stable")[:outliers])
            shared.exception_position = position.astype(np.int64)
            shared.exception_mean = scaled[name][position, 0].astype(np.float32)
            shared.exception_std = scaled[name][position, 1].astype(np.float32)
            if shared.blends:  # an exception overrides a blend: drop it
                keep = ~np.isin(shared.blend_position, position)
                shared.blend_position, shared.blend_component, shared.blend_alpha = (
                    shared.blend_position[keep], shared.blend_component[keep], shared.blend_alpha[keep])
        tensors[name] = shared
    rest = {f"{name}.std": stds[name] for name in stds if name not in tensors}
    result = SharedPosterior("independent", tensors, rest)
    return result, [layer_row(name, tensors[name], means[name], stds[name]) for name in covered]


def _per_point(scale: np.ndarray, shape) -> np.ndarray:
    """A channel (axis 0) value per weight, as a column to divide (mu, sigma) points by."""
    return np.repeat(scale, int(np.prod(shape[1:])))[:, None]


def channel_rms(points: np.ndarray, shape) -> np.ndarray:
    """Initial per-channel scales: the RMS of each channel's (mu, sigma) points (1 for a zero channel)."""
    rms = np.sqrt(np.mean(np.sum(points.reshape(shape[0], -1, 2) ** 2, axis=2), axis=1))
    return np.where(rms > 0, rms, 1.0)


def refit_scales(points, shape, centres, labels, weights=None, rounds=10):
    """Alternating (weighted) least squares, ``rounds`` times: per-channel scales given the
    components (s_c = sum_i w_i p_i . z_i / sum_i w_i |z_i|^2 over the channel's points p_i and
    their components z_i), then the points reassigned and the components moved to the weighted
    mean of their scaled points. ``weights``: per point (k-means' sample weights), default 1."""
    weights = np.ones(len(points)) if weights is None else weights
    per_channel, per_weight = points.reshape(shape[0], -1, 2), weights.reshape(shape[0], -1, 1)
    centres = centres.copy()
    for _ in range(rounds):
        assigned = centres[labels].reshape(shape[0], -1, 2)
        num = np.sum(per_weight * per_channel * assigned, axis=(1, 2))
        den = np.sum(per_weight * assigned ** 2, axis=(1, 2))
        scales = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1.0), 1.0)
        scaled = points / _per_point(scales, shape)
        labels = np.argmin(np.sum((scaled[:, None, :] - centres[None, :, :]) ** 2, axis=2), axis=1)
        for k in np.unique(labels):
            members = labels == k
            centres[k] = np.average(scaled[members], axis=0, weights=weights[members])
    used, labels = np.unique(labels, return_inverse=True)
    return scales, centres[used], labels.reshape(-1)


def add_blends(shared: SharedTensor, points, components, labels, distortion, gain, levels=0) -> np.ndarray:
    """Blend every weight whose best blend (its component and any other, alpha by projection onto
    their W2 geodesic, rounded to a multiple of 1/``levels`` if given) cuts its W2 error by more
    than the fraction ``gain``; returns the new errors."""
    if len(components) < 2:
        return distortion
    second, alpha, best = (np.empty(len(points), dtype) for dtype in (np.int64, np.float64, np.float64))
    for start in range(0, len(points), 4096):  # [chunk, K, 2] intermediates
        part = slice(start, start + 4096)
        direction = components[labels[part]][:, None, :] - components[None, :, :]  # c1 - c2
        length = np.sum(direction ** 2, axis=2)
        along = np.sum((points[part, None, :] - components[None, :, :]) * direction, axis=2) / np.where(length > 0, length, 1.0)
        along = np.clip(along, 0, 1)
        if levels:  # few distinct alphas: blended weights share entries of the generated tables
            along = np.round(along * levels) / levels
        along = along.astype(np.float32).astype(np.float64)  # as stored
        error = np.sqrt(np.sum((points[part, None, :] - components[None, :, :] - along[:, :, None] * direction) ** 2, axis=2))
        error[length == 0] = np.inf  # c2 = c1 or the same point: no blend
        second[part] = np.argmin(error, axis=1)
        rows = np.arange(len(second[part]))
        alpha[part], best[part] = along[rows, second[part]], error[rows, second[part]]
    chosen = np.flatnonzero(best < (1 - gain) * distortion)
    if chosen.size:
        shared.blend_position = chosen.astype(np.int64)
        shared.blend_component = np.stack([labels[chosen], second[chosen]], axis=1).astype(shared.component_index.dtype)
        shared.blend_alpha = alpha[chosen].astype(np.float32)
        distortion = distortion.copy()
        distortion[chosen] = best[chosen]
    return distortion


def layer_row(name: str, shared: SharedTensor, mean: np.ndarray, std: np.ndarray) -> dict:
    """W2 distortion and storage of one initializer, before (two float32 per weight) and after."""
    mu, sigma = expand_tensor(shared)
    distortion = w2(mean.reshape(-1), std.reshape(-1), mu.reshape(-1), sigma.reshape(-1))
    n, k, e, b = shared.size, shared.components, shared.exceptions, shared.blends
    index_bytes = (n + 1) // 2 if k <= 16 else n * (1 if k <= 256 else 2)
    position_bytes = 2 if n <= 1 << 16 else 4
    scales = 0 if shared.channel_scale is None else shared.channel_scale.size
    return {
        "initializer": name, "weights": n, "components": k, "exceptions": e, "blends": b, "channel_scales": scales,
        "mean_w2": float(distortion.mean()), "rms_w2": float(np.sqrt(np.mean(distortion ** 2))), "max_w2": float(distortion.max()),
        "parameters_before": 2 * n, "parameters_after": 2 * k + 2 * e + b + scales,
        "bytes_before": 8 * n, "bytes_after": index_bytes + 8 * k + e * (position_bytes + 8)
        + b * (position_bytes + 2 * shared.component_index.itemsize + 4) + 4 * scales,
        "index_bits": 4 if k <= 16 else (8 if k <= 256 else 16),
    }
