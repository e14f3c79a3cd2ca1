"""From a PyTorch or TensorFlow Probability BNN, write the posterior-mean ONNX and the posterior .npz in one call.

``export_bnn(model, example_inputs, "model.onnx", "post.npz")`` takes

- a bayesian-torch model (Reparameterization/Flipout Linear and Conv1d/2d/3d layers): its layers are
  replaced by ``nn.Linear``/``nn.ConvNd`` holding ``mu_weight``/``mu_kernel``/``mu_bias`` (same module
  paths, so the ONNX initializers are named ``<layer>.weight``), or
- any PyTorch model with ``posterior={parameter name: (mean, std)}``: the parameters are set to the
  means; parameters the dict does not name stay deterministic,

exports the mean network with ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter: offline,
no onnxscript) and places the posterior on its initializers with the importers' matching (which also
follows the exporter's batch-norm folding). Both files are written only when everything succeeded.
The returned `ImportResult` has the report.

``export_tfp(model, "model.onnx", "post.npz")`` does the same for a tf_keras ``Sequential`` model with
``tfp.layers`` (see `export_tfp`).
"""

from __future__ import annotations

import copy
import os
import re

import numpy as np
import onnx

from .errors import PfpcError
from .frontends.importers import atomic_write, extract, write_npz
from .frontends.importers.checkpoint import Gaussian, to_numpy
from .frontends.importers.matching import ImportResult, match_gaussians
from .frontends.onnx_model import fold_constants
from .frontends.posterior import bind_posterior

BAYESIAN_TORCH_LAYER = re.compile(r"^(Linear|Conv([123])d)(Reparameterization|Flipout)$")


def export_bnn(model, example_inputs, onnx_path, npz_path, posterior: dict | None = None, opset: int = 17,
               input_names=None, output_names=None) -> ImportResult:
    """Write the mean network of ``model`` to ``onnx_path`` and its posterior to ``npz_path``."""
    try:
        import torch
    except ImportError:
        raise PfpcError("pfpc.export needs torch (pip install 'pfpc[import]')") from None
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if posterior is None:
        label, gaussians = extract("bayesian-torch", model, "model")
        mean_model = bayesian_torch_mean_network(model)
    else:
        label = "posterior"
        gaussians = _gaussians_from_dict(posterior)
        mean_model = _with_means(model, gaussians)
    mean_model.eval()
    with torch.no_grad():
        if isinstance(mean_model(*example_inputs), (tuple, list)):
            mean_model = _first_output(mean_model)
    onnx_model = _export(mean_model, example_inputs, opset, input_names, output_names)
    return _match_and_write(onnx_model, gaussians, label, onnx_path, npz_path)


def _match_and_write(onnx_model, gaussians, label, onnx_path, npz_path) -> ImportResult:
    """Place ``gaussians`` on ``onnx_model`` and write both files (both or neither)."""
    result = match_gaussians(gaussians, fold_constants(_copy(onnx_model)), label)
    bind_posterior(fold_constants(_copy(onnx_model)), result.arrays, label)
    _write_model(onnx_model, onnx_path)
    try:
        write_npz(result.arrays, npz_path)
    except BaseException:
        os.unlink(onnx_path)
        raise
    return result


def _copy(model):
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def _gaussians_from_dict(posterior):
    gaussians = []
    for name, pair in posterior.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise PfpcError(f"posterior['{name}']: expected a (mean, std) pair")
        mean, std = (to_numpy(value) if to_numpy(value) is not None else np.asarray(value, np.float64) for value in pair)
        if mean.shape != std.shape:
            raise PfpcError(f"posterior['{name}']: mean has shape {list(mean.shape)}, std {list(std.shape)}")
        if not np.all(np.isfinite(std)) or np.any(std < 0):
            raise PfpcError(f"posterior['{name}']: std must be finite and non-negative")
        gaussians.append(Gaussian(name, mean, std, f"posterior['{name}']"))
    return gaussians


def _with_means(model, gaussians):
    import torch

    mean_model = copy.deepcopy(model)
    parameters = dict(mean_model.named_parameters())
    with torch.no_grad():
        for gaussian in gaussians:
            if gaussian.name not in parameters:
                raise PfpcError(f"posterior['{gaussian.name}']: the model has no such parameter (it has {', '.join(list(parameters)[:8])})")
            target = parameters[gaussian.name]
            if tuple(target.shape) != gaussian.mean.shape:
                raise PfpcError(f"posterior['{gaussian.name}']: mean has shape {list(gaussian.mean.shape)}, the parameter {list(target.shape)}")
            target.copy_(torch.as_tensor(gaussian.mean, dtype=target.dtype))
    return mean_model


def bayesian_torch_mean_network(model):
    """A copy of the bayesian-torch ``model`` whose Bayesian layers are plain layers holding the means."""
    mean_model = copy.deepcopy(model)
    replaced = 0
    for name, module in list(mean_model.named_modules()):
        kind = type(module).__name__
        if not kind.endswith(("Reparameterization", "Flipout")):
            continue
        match = BAYESIAN_TORCH_LAYER.match(kind)
        if match is None:
            raise PfpcError(f"model: layer '{name}' is a {kind}; pfpc.export handles Linear and Conv1d/2d/3d "
                            "Reparameterization/Flipout layers")
        parent_name, _, attribute = name.rpartition(".")
        parent = mean_model.get_submodule(parent_name) if parent_name else mean_model
        setattr(parent, attribute, _mean_layer(module, match.group(2)))
        replaced += 1
    if not replaced:
        raise PfpcError("model: no bayesian-torch layer found; for another PyTorch model pass posterior={name: (mean, std)}")
    return mean_model


def _mean_layer(layer, conv_dims):
    import torch
    from torch import nn

    has_bias = getattr(layer, "mu_bias", None) is not None
    if conv_dims is None:
        plain = _bayesian_torch_calling_convention(nn.Linear(layer.in_features, layer.out_features, bias=has_bias), layer)
        weight = layer.mu_weight
    else:
        conv = {"1": nn.Conv1d, "2": nn.Conv2d, "3": nn.Conv3d}[conv_dims]
        plain = _bayesian_torch_calling_convention(conv(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                     padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=has_bias), layer)
        weight = layer.mu_kernel
    with torch.no_grad():
        plain.weight.copy_(weight)
        if has_bias:
            plain.bias.copy_(layer.mu_bias)
    return plain


def _bayesian_torch_calling_convention(plain, layer):
    """Gives a plain layer bayesian-torch's calling convention: ``forward(x, return_kl=True)``
    returns ``(out, kl)`` unless the model was made by ``dnn_to_bnn`` (then ``out`` alone)."""
    import torch

    returns_kl = not getattr(layer, "dnn_to_bnn_flag", False)
    base_forward = plain.forward

    def forward(x, return_kl=True):
        out = base_forward(x)
        return (out, torch.zeros((), dtype=out.dtype)) if return_kl and returns_kl else out

    plain.forward = forward
    return plain


def _first_output(model):
    """The model reduced to its first output (a bayesian-torch model returns ``(out, kl)``)."""
    from torch import nn

    class FirstOutput(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, *inputs):
            return self.model(*inputs)[0]

    return FirstOutput(model)


def _export(model, example_inputs, opset, input_names, output_names):
    import io

    import torch

    buffer = io.BytesIO()
    try:
        torch.onnx.export(model, example_inputs, buffer, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PfpcError(f"model: torch.onnx.export of the mean network failed: {first}") from None
    return onnx.load_from_string(buffer.getvalue())


def _write_model(model, path):
    atomic_write(path, lambda stream: stream.write(model.SerializeToString()), "model")


# ---------------------------------------------------------------------------------------------
# TensorFlow Probability (tf_keras)

#: tf2onnx names a layer's variables ``<model>/<layer>/<op>/ReadVariableOp:0``.
TF2ONNX_VARIABLE = re.compile(r"^(?:.*/)?(?P<layer>[^/]+)/(?P<op>[^/]+)/ReadVariableOp:0$")


def export_tfp(model, onnx_path, npz_path, opset: int = 17, input_name: str = "x") -> ImportResult:
    """Write the posterior-mean network of the tf_keras ``Sequential`` ``model`` (TFP Dense/Conv
    Reparameterization, Flipout, LocalReparameterization and DenseVariational layers, plus any plain
    Keras layers tf2onnx converts: Flatten, MaxPool2D, ReLU, activations, ...) to ``onnx_path`` and its
    posterior to ``npz_path``.

    The TFP layers become Dense/ConvND layers holding their posterior means (same names, same
    activation); tf2onnx converts the result, the Keras input layout included (an NHWC input gets a
    Transpose in front, and Flatten keeps Keras' order); its weight initializers are renamed
    ``<layer>.weight``/``<layer>.bias``. Posteriors are read from the model object (`tfp.from_keras`).
    """
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        raise PfpcError("pfpc.export.export_tfp needs tensorflow, tf_keras, tensorflow-probability and tf2onnx "
                        "(pip install -r requirements-tfp.txt)") from None
    from .frontends.importers import tfp

    label, gaussians = extract("tfp", model, "model")
    mean_model = tfp_mean_network(model)
    spec = (tf.TensorSpec((None, *mean_model.input_shape[1:]), tf.float32, name=input_name),)
    try:
        onnx_model, _ = tf2onnx.convert.from_keras(mean_model, input_signature=spec, opset=opset)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PfpcError(f"model: tf2onnx could not convert the mean network: {first}") from None
    _name_weights_by_layer(onnx_model, {layer.name for layer in tfp.keras_layers(mean_model)})
    return _match_and_write(onnx_model, gaussians, label, onnx_path, npz_path)


def tfp_mean_network(model):
    """A tf_keras ``Sequential`` copy of ``model`` whose TFP layers hold their posterior means."""
    import tf_keras as keras

    from .frontends.importers import tfp

    if not isinstance(model, keras.Sequential):
        raise PfpcError(f"model: export_tfp handles tf_keras Sequential models, not {type(model).__name__}; export the "
                        "mean network yourself and import with import_posterior('tfp', model, onnx_model)")
    layers, weights = [], []
    for layer in model.layers:
        if tfp.is_variational(layer):
            plain, values = _tfp_mean_layer(layer, tfp.layer_posterior(layer, "model"))
        else:
            plain, values = type(layer).from_config(layer.get_config()), layer.get_weights()
        layers.append(plain)
        weights.append(values)
    mean_model = keras.Sequential([keras.Input(model.input_shape[1:])] + layers, name=model.name)
    for plain, values in zip(layers, weights):
        plain.set_weights(values)
    return mean_model


def _tfp_mean_layer(layer, posterior):
    import tf_keras as keras

    use_bias = "bias" in posterior
    if hasattr(layer, "filters"):
        if layer.rank not in (1, 2, 3):
            raise PfpcError(f"model: layer '{layer.name}' is a {layer.rank}-D convolution")
        conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[layer.rank]
        plain = conv(layer.filters, layer.kernel_size, strides=layer.strides, padding=layer.padding, data_format=layer.data_format,
                     dilation_rate=layer.dilation_rate, activation=layer.activation, use_bias=use_bias, name=layer.name)
    elif hasattr(layer, "units"):
        plain = keras.layers.Dense(layer.units, activation=layer.activation, use_bias=use_bias, name=layer.name)
    else:
        raise PfpcError(f"model: layer '{layer.name}' is a {type(layer).__name__}; export_tfp handles TFP Dense and Conv layers")
    return plain, [posterior[role][0].astype(np.float32) for role in ("weight", "bias") if role in posterior]


def _name_weights_by_layer(onnx_model, layer_names):
    """Rename tf2onnx's ``<model>/<layer>/<op>/ReadVariableOp:0`` weights to ``<layer>.weight|bias``."""
    renames = {}
    for init in onnx_model.graph.initializer:
        match = TF2ONNX_VARIABLE.match(init.name)
        if match and match["layer"] in layer_names:
            renames[init.name] = f"{match['layer']}.{'bias' if match['op'] == 'BiasAdd' else 'weight'}"
    if len(set(renames.values())) != len(renames):
        return  # ambiguous: keep tf2onnx's names (matching falls back to shapes and values)
    for init in onnx_model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in onnx_model.graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
