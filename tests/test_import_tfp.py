"""TensorFlow Probability import (pfpc/frontends/importers/tfp.py, pfpc.export.export_tfp) against
TFP's own sampling.

Small tf_keras models with ``tfp.layers`` (Dense Flipout / Reparameterization / LocalReparameterization,
DenseVariational with the tutorial's posterior, Conv2D Reparameterization / Flipout) are trained for
a few steps on scikit-learn's digits, their posterior-mean networks exported to ONNX (tf2onnx), the
posteriors imported from the files TFP users save (tf_keras HDF5 weights, TF checkpoints) or from
the model object, compiled with pfpc and compared with Monte Carlo over the Keras model's own calls
(every call of a TFP layer samples its weights). One hidden ReLU layer and a deterministic input make
the PFP exact (means and variances within 5 MC standard errors); the CNNs (conv -> ReLU -> dense) get
the bounds of tests/test_importers.py on the approximation's error. A wrong transform (exp for
softplus) and a wrong layout fail these checks.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: no C++ info logs

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

tfp = pytest.importorskip("tensorflow_probability")
pytest.importorskip("tf2onnx")
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import pfpc.cli  # noqa: E402
from mc_checks import check_approximate, check_exact, compile_pfp  # noqa: E402
from pfpc.errors import PfpcError  # noqa: E402
from pfpc.export import export_tfp  # noqa: E402
from pfpc.frontends.importers import import_posterior, match_posterior  # noqa: E402
from pfpc.frontends.importers import tfp as tfp_importer  # noqa: E402

tfl, tfd = tfp.layers, tfp.distributions
SAMPLES = 2000


def _scale_init(seed):
    """Untransformed scales around -1 with spread 0.5: stds vary from weight to weight, and softplus
    (0.31 at -1) and exp (0.37) differ clearly (TFP's default, -3, makes them nearly equal)."""
    return tfl.default_mean_field_normal_fn(untransformed_scale_initializer=keras.initializers.RandomNormal(-1.0, 0.5, seed=seed))


def posterior_mean_field(kernel_size, bias_size=0, dtype=None):
    """TFP's tutorial posterior for DenseVariational (Probabilistic Layers Regression)."""
    n = kernel_size + bias_size
    c = np.log(np.expm1(1.0))
    return keras.Sequential([
        tfl.VariableLayer(2 * n, dtype=dtype, initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=7)),
        tfl.DistributionLambda(lambda t: tfd.Independent(tfd.Normal(loc=t[..., :n], scale=1e-5 + tf.nn.softplus(c + t[..., n:])),
                                                         reinterpreted_batch_ndims=1)),
    ])


def prior_trainable(kernel_size, bias_size=0, dtype=None):
    n = kernel_size + bias_size
    return keras.Sequential([
        tfl.VariableLayer(n, dtype=dtype),
        tfl.DistributionLambda(lambda t: tfd.Independent(tfd.Normal(loc=t, scale=1), reinterpreted_batch_ndims=1)),
    ])


def dense_flipout():
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(name="flat"),
        tfl.DenseFlipout(24, activation="relu", name="fc1", kernel_posterior_fn=_scale_init(1)),
        tfl.DenseReparameterization(10, name="fc2", kernel_posterior_fn=_scale_init(2)),
    ], name="mlp")


def dense_variational(count):
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(name="flat"),
        tfl.DenseLocalReparameterization(20, activation="relu", name="local", kernel_posterior_fn=_scale_init(3)),
        tfl.DenseVariational(10, posterior_mean_field, prior_trainable, kl_weight=1 / count, name="variational"),
    ], name="mlp_variational")


def conv(layer_type):
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layer_type(4, 3, padding="same", activation="relu", name="conv", kernel_posterior_fn=_scale_init(4)),
        keras.layers.Flatten(name="flat"),
        tfl.DenseReparameterization(10, name="fc", kernel_posterior_fn=_scale_init(5)),
    ], name="cnn")


class Trained:
    """A trained TFP model, its exported mean network and posterior, and its weights on disk."""

    def __init__(self, model, directory, x):
        self.model, self.x = model, x
        self.onnx, self.npz = str(directory / "model.onnx"), str(directory / "post.npz")
        self.result = export_tfp(model, self.onnx, self.npz)
        self.h5 = str(directory / "weights.h5")
        model.save_weights(self.h5)
        self.checkpoint = str(directory / "ckpt" / "weights")
        model.save_weights(self.checkpoint)
        self._samples = None

    def samples(self):
        """SAMPLES outputs of the Keras model on ``x``: each call samples the weights anew (TFP)."""
        if self._samples is None:
            tf.random.set_seed(123)
            forward = tf.function(lambda inputs: self.model(inputs))
            inputs = tf.constant(self.x)
            self._samples = np.stack([forward(inputs).numpy() for _ in range(SAMPLES)])
        return self._samples


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[:512] / 16.0).astype(np.float32)[..., None]
    return x, data.target[:512].astype(np.int64)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Each model trained for a few steps of its ELBO (cross entropy + the layers' KL losses)."""
    tf.random.set_seed(0)
    x, y = digits
    made = {}
    builders = {"dense_flipout": dense_flipout, "dense_variational": lambda: dense_variational(len(x)),
                "conv_reparameterization": lambda: conv(tfl.Convolution2DReparameterization),
                "conv_flipout": lambda: conv(tfl.Convolution2DFlipout)}

    def get(name):
        if name not in made:
            model = builders[name]()
            model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, batch_size=128, epochs=2, verbose=0)
            made[name] = Trained(model, tmp_path_factory.mktemp(name), x[:4])
        return made[name]

    return get


# ---------------------------------------------------------------------------------------------
# PFP vs TFP's Monte Carlo


def test_dense_flipout_from_h5_via_cli(trained, tmp_path, capsys):
    """DenseFlipout + DenseReparameterization, posterior read from ``save_weights('w.h5')``."""
    model = trained("dense_flipout")
    npz = str(tmp_path / "post.npz")
    assert pfpc.cli.main(["import-posterior", "--from", "tfp", model.h5, "--onnx", model.onnx, "-o", npz]) == 0
    report = capsys.readouterr().out
    print(report)
    assert "fc1.weight [64, 24] <- fc1/kernel_posterior_loc, fc1/kernel_posterior_untransformed_scale (std = softplus(untransformed_scale) + 1.19e-07) [by name; transposed" in report
    assert "deterministic (no posterior): fc1.bias, fc2.bias" in report
    arrays = dict(np.load(npz))
    assert sorted(arrays) == ["fc1.weight.std", "fc2.weight.std"]
    check_exact(compile_pfp(model.onnx, arrays, model.x, tmp_path), model.samples())


def test_file_transform_is_tfps(trained, tmp_path):
    """The std read from the file (softplus + eps applied by pfpc) equals TFP's own ``stddev()`` of the
    layer's posterior; a TF checkpoint and a whole-model .h5 give the same as the weights .h5."""
    model = trained("dense_flipout")
    whole = str(tmp_path / "model.h5")
    model.model.save(whole)
    from_object = import_posterior("tfp", model.model, model.onnx)
    for source in (model.h5, model.checkpoint, whole):
        from_file = import_posterior("tfp", source, model.onnx)
        assert sorted(from_file) == sorted(from_object)
        for key in from_file:
            np.testing.assert_allclose(from_file[key], from_object[key], rtol=4e-7, atol=0)  # TFP rounds in float32


def test_wrong_transform_fails(trained, tmp_path, monkeypatch):
    """exp in place of softplus: the same Monte Carlo check fails."""
    model = trained("dense_flipout")
    monkeypatch.setattr(tfp_importer, "std_from_untransformed", lambda u: tfp_importer.FLOAT32_EPS + np.exp(u))
    arrays = import_posterior("tfp", model.h5, model.onnx)
    with pytest.raises(AssertionError):
        check_exact(compile_pfp(model.onnx, arrays, model.x, tmp_path), model.samples())


def test_wrong_layout_fails(trained, tmp_path):
    """The output layer's std in the wrong order ([in, out] read as [out, in] and reshaped back, a
    reshape instead of a transpose): the check fails (measured 13 MC standard errors)."""
    model = trained("dense_flipout")
    arrays = import_posterior("tfp", model.h5, model.onnx)
    onnx_std = arrays["fc2.weight.std"]  # [in, out] for the ONNX MatMul
    arrays["fc2.weight.std"] = onnx_std.T.reshape(onnx_std.shape)
    with pytest.raises(AssertionError):
        check_exact(compile_pfp(model.onnx, arrays, model.x, tmp_path), model.samples())


def test_dense_variational_from_model(trained, tmp_path):
    """DenseLocalReparameterization + DenseVariational (tutorial posterior: kernel and bias in one
    vector, scale 1e-5 + softplus(c + t)), read from the model object."""
    model = trained("dense_variational")
    assert "variational.bias [10] <- variational bias: DenseVariational posterior" in model.result.report()
    check_exact(compile_pfp(model.onnx, dict(np.load(model.npz)), model.x, tmp_path), model.samples())


def test_dense_variational_file_refused(trained):
    """Its transform is Python code, not in the weights file: refused, not guessed."""
    model = trained("dense_variational")
    for source, key in ((model.h5, "variational/posterior/constant"), (model.checkpoint, "layer_with_weights-1/_posterior/")):
        with pytest.raises(PfpcError, match=f"'{key}.*DenseVariational posterior.*never guesses.*import_posterior\\('tfp', model"):
            import_posterior("tfp", source, model.onnx)


@pytest.mark.parametrize("name", ["conv_reparameterization", "conv_flipout"])
def test_conv_from_checkpoint(trained, tmp_path, name):
    """Convolution2D Reparameterization/Flipout (HWIO kernels) read from a TF checkpoint (layers are
    numbered there, not named: placed by shape and values)."""
    model = trained(name)
    result = match_posterior("tfp", model.checkpoint, model.onnx)
    placed = {m.initializer: m for m in result.matches}
    assert sorted(placed) == ["conv.weight", "fc.weight"], result.report()
    assert placed["conv.weight"].std.shape == (4, 1, 3, 3)  # HWIO -> OIHW
    check_approximate(compile_pfp(model.onnx, result.arrays, model.x, tmp_path), model.samples())


# ---------------------------------------------------------------------------------------------
# the mean network's ONNX


def test_export_matches_keras_forward(tmp_path):
    """With the scales at -40 (std = eps) the TFP model is its mean network: onnxruntime on the
    exported ONNX (NHWC input with 3 channels, conv, max pool, flatten in Keras order, dense) agrees
    with the Keras model's own forward pass to 1e-5."""
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        tfl.Convolution2DFlipout(5, 3, padding="valid", activation="relu", name="conv"),
        keras.layers.MaxPool2D(2, name="pool"), keras.layers.Flatten(name="flat"),
        tfl.DenseReparameterization(7, activation="relu", name="fc1"),
        tfl.DenseLocalReparameterization(3, name="fc2"),
    ])
    rng = np.random.default_rng(0)
    model(np.zeros((1, 6, 6, 3), np.float32))
    for variable in model.weights:
        values = rng.normal(0.0, 0.3, variable.shape) if "loc" in variable.name else np.full(variable.shape, -40.0)
        variable.assign(values.astype(np.float32))
    export_tfp(model, tmp_path / "model.onnx", tmp_path / "post.npz")
    x = rng.normal(size=(5, 6, 6, 3)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    keras_out = model(x).numpy()
    print(f"ONNX vs Keras (std = eps): max |difference| {np.max(np.abs(onnx_out - keras_out)):.2g}, max |output| {np.max(np.abs(keras_out)):.3g}")
    np.testing.assert_allclose(onnx_out, keras_out, rtol=1e-5, atol=1e-5)
    # pfpc compiles tf2onnx's graph (input Transpose, max pool, Transpose before the flatten)
    pfp_mean, _ = compile_pfp(str(tmp_path / "model.onnx"), dict(np.load(tmp_path / "post.npz")), x, tmp_path)
    np.testing.assert_allclose(np.reshape(pfp_mean, keras_out.shape), keras_out, rtol=1e-5, atol=1e-5)


def test_dense_variational_multivariate_normal_diag():
    """A DenseVariational posterior written as MultivariateNormalDiag: kernel and bias split as the
    layer does, std = the user's formula evaluated on the layer's variable."""
    c = np.log(np.expm1(1.0))

    def posterior_diag(kernel_size, bias_size=0, dtype=None):
        n = kernel_size + bias_size
        return keras.Sequential([
            tfl.VariableLayer(2 * n, dtype=dtype, initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=3)),
            tfl.DistributionLambda(lambda t: tfd.MultivariateNormalDiag(loc=t[..., :n], scale_diag=1e-5 + tf.nn.softplus(c + t[..., n:]))),
        ])

    model = keras.Sequential([keras.Input((3,)), tfl.DenseVariational(2, posterior_diag, prior_trainable, name="diag")])
    model(np.zeros((1, 3), np.float32))
    vector = model.layers[0]._posterior.layers[0].weights[0].numpy().astype(np.float64)
    loc, untransformed = vector[:8], vector[8:]
    std = 1e-5 + np.logaddexp(0.0, c + untransformed)
    weight, bias = tfp_importer.from_keras(model, "model")
    assert (weight.name, bias.name) == ("diag.weight", "diag.bias")
    np.testing.assert_allclose(weight.mean, loc[:6].reshape(3, 2).T, rtol=1e-6)
    np.testing.assert_allclose(weight.std, std[:6].reshape(3, 2).T, rtol=1e-6)
    np.testing.assert_allclose(bias.mean, loc[6:], rtol=1e-6)
    np.testing.assert_allclose(bias.std, std[6:], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_layout_lists_keys(trained, tmp_path, capsys):
    """A plain Keras weights file: one line listing the keys found, exit 2, nothing written; the
    TFP file read as bayesian-torch points at --from tfp."""
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    plain.save_weights(str(tmp_path / "plain.h5"))
    model = trained("dense_flipout")
    npz = tmp_path / "post.npz"
    assert pfpc.cli.main(["import-posterior", "--from", "tfp", str(tmp_path / "plain.h5"), "--onnx", model.onnx, "-o", str(npz)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no tfp posterior found" in error and "'dense/bias', 'dense/kernel'" in error, error
    assert pfpc.cli.main(["import-posterior", "--from", "bayesian-torch", model.h5, "--onnx", model.onnx, "-o", str(npz)]) == 2
    error = capsys.readouterr().err.strip()
    assert "it looks like --from tfp" in error and "'fc1/kernel_posterior_loc'" in error, error
    assert not npz.exists()


def test_full_covariance_refused(tmp_path):
    """A DenseVariational posterior that is not mean-field is refused by name."""
    def posterior_tril(kernel_size, bias_size=0, dtype=None):
        n = kernel_size + bias_size
        return keras.Sequential([tfl.VariableLayer(tfl.MultivariateNormalTriL.params_size(n), dtype=dtype),
                                 tfl.MultivariateNormalTriL(n)])

    model = keras.Sequential([keras.Input((3,)), tfl.DenseVariational(2, posterior_tril, prior_trainable, name="full")])
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(PfpcError, match="layer 'full' \\(DenseVariational\\): the posterior is MultivariateNormalTriL; pfpc needs a mean-field"):
        tfp_importer.from_keras(model, "model")


@pytest.mark.parametrize("name, content, message", [
    ("weights.h5", b"not hdf5", "not a readable HDF5 weights file"),
    ("missing.h5", None, "no such weights file"),
    ("ckpt.index", b"", "not a readable TF checkpoint"),
])
def test_unreadable_files(trained, tmp_path, capsys, name, content, message):
    """Broken or missing Keras files: one line naming the file, exit 2, nothing written."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    npz = tmp_path / "post.npz"
    assert pfpc.cli.main(["import-posterior", "--from", "tfp", str(path), "--onnx", trained("dense_flipout").onnx, "-o", str(npz)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and name.split(".")[0] in error, error
    assert not npz.exists()


def test_unbuilt_model_refused():
    model = keras.Sequential([tfl.DenseFlipout(2, name="fc")])
    with pytest.raises(PfpcError, match="Sequential: the Keras model is not built yet"):
        import_posterior("tfp", model, "unused.onnx")
