"""TensorFlow Probability: tf_keras models with ``tfp.layers`` variational layers.

From a weights file (``model.save_weights("w.h5")``, a tf_keras ``model.save("m.h5")``, or a TF
checkpoint ``model.save_weights("ckpt/w")``, read by `checkpoint.load`): the layers built with
``default_mean_field_normal_fn`` -- DenseReparameterization, DenseFlipout,
DenseLocalReparameterization, Convolution1D/2D/3DReparameterization and ...Flipout -- store
``<layer>/kernel_posterior_loc`` and ``<layer>/kernel_posterior_untransformed_scale``; those names are
made by TFP's ``default_loc_scale_fn``, whose scale is ``eps + softplus(untransformed_scale)`` with eps
the float32 machine epsilon (``tfp_util.DeferredTensor(untransformed_scale, lambda x:
np.finfo(dtype).eps + tf.nn.softplus(x))``). A ``*_posterior_loc`` without its scale is a
``Deterministic`` posterior (TFP's default for biases): it stays deterministic.

From a model object (Python API): each layer's posterior distribution is asked for its ``mean()``
and ``stddev()`` (TFP computes the transform), which also covers ``tfp.layers.DenseVariational``
whose posterior is a user function (TFP's tutorial: ``VariableLayer`` + ``Independent(Normal(loc,
1e-5 + softplus(c + t)))``, or ``MultivariateNormalDiag``). Such a posterior's transform lives in
Python code, not in the weights file, so a file holding one is refused: the transform is never
guessed. Posteriors that are not mean-field Gaussians are refused.

Layouts: Keras kernels are ``[in, out]`` (Dense) and ``[kh, kw, in, out]`` (HWIO, also 1-D/3-D);
they are turned into PyTorch's ``[out, in]`` / OIHW, which the matching places on Gemm/MatMul/Conv.
"""

from __future__ import annotations

import numpy as np

from ...errors import PfpcError
from .checkpoint import Gaussian, state_dict_arrays

EXPECTED = "<layer>/kernel_posterior_loc with <layer>/kernel_posterior_untransformed_scale (tfp.layers)"
FLOAT32_EPS = float(np.finfo(np.float32).eps)
STD_FORMULA = f"softplus(untransformed_scale) + {FLOAT32_EPS:.3g}"


def extract(obj, label):
    if hasattr(obj, "layers") or hasattr(obj, "kernel_posterior") or hasattr(obj, "_posterior"):
        return from_keras(obj, label)
    return from_arrays(state_dict_arrays(obj, label), label)


def std_from_untransformed(untransformed_scale: np.ndarray) -> np.ndarray:
    """TFP's ``default_loc_scale_fn`` scale: float32 eps + softplus (stable for large values)."""
    return FLOAT32_EPS + np.logaddexp(0.0, untransformed_scale)


def torch_layout(kernel: np.ndarray) -> np.ndarray:
    """Keras ``[..., in, out]`` (Dense [in, out], Conv HWIO) -> PyTorch ``[out, in, ...]``."""
    if kernel.ndim < 2:
        return kernel
    return np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))


def _role(parameter):
    return {"kernel": "weight", "bias": "bias"}.get(parameter.split("_posterior")[0])


def from_arrays(arrays: dict, label: str) -> list:
    """Gaussians of the ``<layer>/<kernel|bias>_posterior_loc`` / ``_untransformed_scale`` pairs."""
    variational = [key for key in arrays if {"posterior", "_posterior"} & set(key.split("/")[:-1])]
    if variational:
        raise PfpcError(f"{label}: '{variational[0]}' holds the parameters of a DenseVariational posterior, a user-defined "
                        "function whose transform is in Python code, not in the weights file (pfpc never guesses it); "
                        "import from Python with the model: pfpc.frontends.importers.import_posterior('tfp', model, onnx_model)")
    found = []
    for key, loc in arrays.items():
        if not key.endswith("_posterior_loc"):
            continue
        prefix = key[: -len("_loc")]
        scale_key = f"{prefix}_untransformed_scale"
        if scale_key not in arrays:
            continue  # Deterministic posterior (TFP's default for biases)
        scale = arrays[scale_key]
        if scale.shape != loc.shape:
            raise PfpcError(f"{label}: '{key}' has shape {list(loc.shape)} but '{scale_key}' has {list(scale.shape)}")
        layer, _, parameter = prefix.rpartition("/")
        role = _role(parameter) or parameter
        std = std_from_untransformed(scale)
        name = f"{layer.replace('/', '.')}.{role}" if layer else role
        found.append(Gaussian(name, torch_layout(loc), torch_layout(std), f"{key}, {scale_key} (std = {STD_FORMULA})"))
    return found


# ---------------------------------------------------------------------------------------------
# model objects


def keras_layers(model):
    """The layers of ``model`` in order, nested models flattened (a layer is its own list)."""
    if not hasattr(model, "layers"):
        return [model]
    return [leaf for layer in model.layers for leaf in keras_layers(layer)]


def is_variational(layer) -> bool:
    """A TFP variational layer: kernel/bias posterior distributions or a DenseVariational posterior."""
    return hasattr(layer, "kernel_posterior") or _is_dense_variational(layer)


def _is_dense_variational(layer):
    return hasattr(layer, "_posterior") and hasattr(layer, "units")


def posterior_moments(distribution, where: str):
    """(mean, std) of a mean-field Gaussian posterior as TFP computes them; (mean, None) for a
    Deterministic one; a one-line error for anything else."""
    import tensorflow as tf
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    inner = distribution
    while True:  # through Independent and DistributionLambda's tensor-coercible wrapper
        wrapped = inner.distribution if isinstance(inner, tfd.Independent) else getattr(inner, "tensor_distribution", None)
        if wrapped is None:
            break
        inner = wrapped
    if isinstance(inner, (tfd.Deterministic, tfd.VectorDeterministic)):
        return np.asarray(distribution.mean(), np.float64), None
    diagonal = isinstance(inner, tfd.MultivariateNormalLinearOperator) and isinstance(inner.scale, tf.linalg.LinearOperatorDiag)
    if not (isinstance(inner, tfd.Normal) or diagonal):
        raise PfpcError(f"{where}: the posterior is {type(inner).__name__.lstrip('_')}; pfpc needs a mean-field Gaussian "
                        "(Normal, Independent(Normal) or MultivariateNormalDiag)")
    return np.asarray(distribution.mean(), np.float64), np.asarray(distribution.stddev(), np.float64)


def layer_posterior(layer, label: str) -> dict:
    """``{"weight": (mean, std|None), "bias": ...}`` of a TFP layer, in the Keras layout."""
    where = f"{label}: layer '{layer.name}' ({type(layer).__name__})"
    if not _is_dense_variational(layer):
        found = {"weight": posterior_moments(layer.kernel_posterior, where)}
        if getattr(layer, "bias_posterior", None) is not None:
            found["bias"] = posterior_moments(layer.bias_posterior, where)
        return found
    inputs = layer.input_spec.axes[-1]
    mean, std = posterior_moments(layer._posterior(np.zeros((1, inputs), np.float32)), where)
    size = inputs * layer.units
    if mean.shape != (size + (layer.units if layer.use_bias else 0),):
        raise PfpcError(f"{where}: the posterior has shape {list(mean.shape)}, expected one vector of kernel and bias")

    def split(vector):  # as the layer's call does: tf.split([in * units, units]), kernel reshaped [in, units]
        return {"weight": vector[:size].reshape(inputs, layer.units), "bias": vector[size:]} if vector is not None else {}

    means, stds = split(mean), split(std)
    return {role: (means[role], stds.get(role)) for role in (("weight", "bias") if layer.use_bias else ("weight",))}


def from_keras(model, label: str) -> list:
    if not getattr(model, "built", True):  # TFP layers create their posteriors when built
        raise PfpcError(f"{label}: the Keras model is not built yet (call it on an input, or train it, first)")
    found = []
    for layer in keras_layers(model):
        if not is_variational(layer):
            continue
        how = ("DenseVariational posterior: mean() and stddev() split into kernel and bias" if _is_dense_variational(layer)
               else "mean() and stddev() of the layer's posterior")
        for role, (mean, std) in layer_posterior(layer, label).items():
            if std is not None:
                found.append(Gaussian(f"{layer.name}.{role}", torch_layout(mean), torch_layout(std), f"{layer.name} {role}: {how}"))
    return found
