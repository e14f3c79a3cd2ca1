"""The embedded architectures as other exporters write them: torch's dynamo exporter
(``torch.onnx.export(..., dynamo=True)``, which needs onnxscript: the ``[export]`` and ``[test]``
extras pin 0.7.2) on the models of tests/architectures.py and tests/test_new_architectures.py, and
Keras models converted by tf2onnx (MLPerf Tiny's DS-CNN and ResNet-8 layouts, narrowed, ending in
a softmax; channels-last, so the converter adds Transposes). Exports are made in the test, offline.

Each compiles; with zero variance it equals onnxruntime (rtol 1e-4); with a random posterior
(std 0.1 |w| + 1e-3 on every conv and dense weight) the logits' moments equal the float64 NumPy
reference (1e-4) and a softmax output the mean-field probabilities of those moments (1e-4). The
Cortex-M4 build runs under QEMU (`pfpc.runner.run(emulate=True)`) when it fits 1 MB of flash and
512 KB of RAM (measured by the compile), and matches the host build of the same C (1e-5).
Tests marked slow (larger models, QEMU) run with PFPC_SLOW_TESTS=1."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import architectures  # noqa: E402
import reference  # noqa: E402
import test_new_architectures  # noqa: E402
import torch_models  # noqa: E402
from helpers import assert_close  # noqa: E402
from test_softmax_outputs import meanfield  # noqa: E402

from pfpc import compiler  # noqa: E402

FLASH, RAM = 1024 * 1024, 512 * 1024
CAN_EMULATE = all(shutil.which(tool) for tool in ("arm-none-eabi-gcc", "qemu-system-arm"))
#: quick enough for every run (< 20 s together on a busy machine); the rest is marked slow
FAST = {("dynamo", "seed_lenet"), ("keras", "dscnn")}


def _torch_model(name):
    if name in architectures.ARCHITECTURES:
        return architectures.build(name)
    torch.manual_seed(0)
    model = test_new_architectures.ARCHITECTURES[name]()
    torch_models._randomise_batch_norms(model, torch.Generator().manual_seed(0))
    return model.eval()


def dynamo_export(name):
    """(ONNX model, input) of ``name`` exported by torch's dynamo exporter (opset 18)."""
    pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript (pip install '.[export]')")
    model = _torch_model(name)
    example = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(1))
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18, input_names=["x"], output_names=["y"], verbose=False)
    return program.model_proto, np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)


def keras_models():
    import tensorflow as tf

    layers = tf.keras.layers

    def dscnn():
        """MLPerf Tiny keyword spotting (DS-CNN) on 49x10 MFCCs, narrowed to 16 channels."""
        x = inp = tf.keras.Input((49, 10, 1), batch_size=1, name="x")
        x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, (10, 4), strides=(2, 2), padding="same", use_bias=False)(x)))
        for _ in range(2):
            x = layers.ReLU()(layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)))
            x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 1, use_bias=False)(x)))
        x = layers.Flatten()(layers.AveragePooling2D(pool_size=(25, 5))(x))
        return tf.keras.Model(inp, layers.Dense(12, activation="softmax")(x))

    def resnet8():
        """MLPerf Tiny image classification (ResNet-8 layout) on 16x16x3, narrowed to 8/16 filters."""
        x = inp = tf.keras.Input((16, 16, 3), batch_size=1, name="x")
        x = layers.Activation("relu")(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
        for filters, stride in ((8, 1), (16, 2)):
            y = layers.Activation("relu")(layers.BatchNormalization()(layers.Conv2D(filters, 3, strides=stride, padding="same")(x)))
            y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(y))
            if stride != 1:
                x = layers.Conv2D(filters, 1, strides=stride, padding="same")(x)
            x = layers.Activation("relu")(layers.Add()([x, y]))
        x = layers.Flatten()(layers.AveragePooling2D(pool_size=x.shape[1:3])(x))
        return tf.keras.Model(inp, layers.Dense(10, activation="softmax")(x))

    return {"dscnn": dscnn, "resnet8": resnet8}


def keras_export(name):
    """(ONNX model, input) of the Keras model ``name`` converted by tf2onnx (opset 13), with
    trained-looking batch norms."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    tf.keras.utils.set_random_seed(0)
    model = keras_models()[name]()
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in layer.get_weights())
            layer.set_weights([rng.uniform(0.5, 1.5, gamma), rng.normal(0, 0.1, beta), rng.normal(0, 0.1, mean), rng.uniform(0.5, 1.5, var)])
    spec = (tf.TensorSpec(model.inputs[0].shape, tf.float32, name="x"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=13)
    return proto, np.random.default_rng(3).standard_normal(model.inputs[0].shape).astype(np.float32)


CASES = [("dynamo", name) for name in sorted(architectures.ARCHITECTURES) + sorted(test_new_architectures.ARCHITECTURES)]
CASES += [("keras", name) for name in ("dscnn", "resnet8")]


@pytest.mark.parametrize("exporter,name", [pytest.param(*case, marks=() if case in FAST else pytest.mark.slow) for case in CASES])
def test_exported_architecture(tmp_path, exporter, name):
    import onnxruntime as ort

    onnx_model, x = (dynamo_export if exporter == "dynamo" else keras_export)(name)
    feed = {onnx_model.graph.input[0].name: x}
    # zero variance: onnxruntime's output
    out = str(tmp_path / "det")
    compiler.compile(onnx_model, None, out_dir=out)
    (value, var), = compiler.run(out, [x]).outputs
    expected = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(value.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert var is None or np.all(var == 0)
    # a posterior: the NumPy reference (a softmax output: its logits' moments, its value their mean-field probabilities)
    stds = architectures.posterior(onnx_model)
    emulate = CAN_EMULATE and os.environ.get("PFPC_SLOW_TESTS") == "1"
    out = str(tmp_path / "post")
    compiled = compiler.compile(onnx_model, stds, out_dir=out, target="cortex-m4" if emulate else "host", measure=emulate,
                                covariance="none")  # the diagonal PFP of tests/reference.py
    result = compiler.run(out, [x])
    variances = {k[: -len(".std")]: v.astype(np.float64) ** 2 for k, v in stds.items()}
    (ref_mean, ref_var), = reference.pfp_onnx(onnx_model, variances, feed).values()
    mean, var = result.logits[0] if result.logits else result.outputs[0]
    assert np.all(ref_var > 0)
    assert_close(mean.reshape(ref_mean.shape), ref_mean, rtol=1e-4, what=f"{exporter} {name} mean")
    assert_close(var.reshape(ref_var.shape), ref_var, rtol=1e-4, what=f"{exporter} {name} var")
    if result.logits:
        np.testing.assert_allclose(result.outputs[0][0].reshape(ref_mean.shape), meanfield(ref_mean, ref_var, -1), rtol=1e-4, atol=1e-6)
    if not emulate:
        return
    footprint = compiled.footprint
    print(f"{exporter} {name}: cortex-m4 flash {footprint['flash_bytes']:,} bytes, RAM {footprint['ram_bytes']:,} bytes")
    if footprint["flash_bytes"] > FLASH or footprint["ram_bytes"] > RAM:
        return  # larger than the board the issue targets
    on_device = compiler.run(out, [x], emulate=True)
    for host, device in zip(result.outputs + list(result.logits.values()), on_device.outputs + list(on_device.logits.values())):
        for a, b in zip(host, device):
            if a is not None:
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
