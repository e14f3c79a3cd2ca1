"""Monte Carlo ground truth: sample weights from the posterior, run the mean network's graph in
onnxruntime once per sample, and compare the sample moments with the compiled PFP."""

from __future__ import annotations

import os

import numpy as np
import onnx

from .frontends.onnx_model import final_softmax
from .frontends.onnxruntime_session import ort_session
from .frontends.posterior import Posterior
from .ops import registry


def sampling_session(model: onnx.ModelProto, posterior: Posterior, keep_softmax: bool = False):
    """An onnxruntime session of the mean network whose stochastic initializers are graph
    inputs, so each run can be fed one draw of the weights; returns (session, stochastic names).
    An output computed by a final Softmax/LogSoftmax becomes its logits (what evaluation and
    benchmarks sample), unless ``keep_softmax``: then it stays and `_softmax_outputs_and_logits`
    adds its logits (and, for LogSoftmax, its probabilities) after the outputs."""
    stochastic = sorted(posterior.variances)
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    kept = [init for init in graph.graph.initializer if init.name not in stochastic]
    shapes = {init.name: list(init.dims) for init in graph.graph.initializer}
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for name in stochastic:
        graph.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes[name]))
    (_softmax_outputs_and_logits if keep_softmax else _logits_as_outputs)(graph.graph)
    return ort_session(graph, threads=1), stochastic


def weight_sampler(posterior: Posterior, stochastic, seed: int = 0, dtype=np.float64):
    """A function returning one draw w ~ N(mean, var) of every tensor in ``stochastic`` as float32
    arrays. ``dtype`` is the arithmetic of the draw: float64 for reference Monte Carlo, float32
    for timing what users run."""
    rng = np.random.default_rng(seed)
    means = {name: posterior.means[name].astype(dtype) for name in stochastic}
    stds = {name: np.sqrt(posterior.variances[name].astype(dtype)) for name in stochastic}

    def draw() -> dict:
        return {
            name: (means[name] + stds[name] * rng.standard_normal(means[name].shape, dtype=dtype)).astype(np.float32, copy=False)
            for name in stochastic
        }

    return draw


def sampled_outputs(model: onnx.ModelProto, posterior: Posterior, inputs: dict, samples: int, seed: int = 0,
                    keep_softmax: bool = False):
    """Yield, per weight sample w ~ q(w) = N(mean, var) (NumPy, float64 then float32), the list of
    the model's outputs for ``inputs`` (one onnxruntime run each; `sampling_session` says what
    becomes of a softmax output). Also the output names first."""
    session, stochastic = sampling_session(model, posterior, keep_softmax)
    draw = weight_sampler(posterior, stochastic, seed)
    names = [o.name for o in session.get_outputs()]
    yield names
    for _ in range(samples):
        yield session.run(names, {**inputs, **draw()})


def monte_carlo(model: onnx.ModelProto, posterior: Posterior, inputs: dict, samples: int, seed: int = 0,
                keep_softmax: bool = False):
    """Per output: (sample mean, sample variance, standard error of the mean, standard error of
    the variance), the last from the sample's fourth central moment: sqrt((m4 - var^2) / S)."""
    stream = sampled_outputs(model, posterior, inputs, samples, seed, keep_softmax)
    names = next(stream)
    shift = None  # raw moments about the first sample keep the fourth moment well conditioned
    sums = [[0.0] * 4 for _ in names]
    for values in stream:
        if shift is None:
            shift = [v.astype(np.float64) for v in values]
        for index, value in enumerate(values):
            centred = value.astype(np.float64) - shift[index]
            power = centred
            for order in range(4):
                sums[index][order] = sums[index][order] + power
                power = power * centred
    results = []
    for index in range(len(names)):
        m1, m2, m3, m4 = (total / samples for total in sums[index])
        central2 = np.maximum(m2 - m1 * m1, 0.0)
        central4 = np.maximum(m4 - 4 * m3 * m1 + 6 * m2 * m1 * m1 - 3 * m1**4, 0.0)
        var = central2 * samples / max(samples - 1, 1)
        results.append((m1 + shift[index], var, np.sqrt(var / samples), np.sqrt(np.maximum(central4 - central2**2, 0.0) / samples)))
    return names, results


def _logits_as_outputs(graph):
    """An output computed by a final Softmax/LogSoftmax becomes that node's input (the logits,
    whose moments the compiled PFP returns beside the probabilities), so MC samples the logits."""
    for output in graph.output:
        node = final_softmax(graph, output.name)
        if node is not None:
            output.name = node.input[0]


def _softmax_outputs_and_logits(graph):
    """After the outputs: for every output computed by a final Softmax/LogSoftmax its logits
    (``softmax_logits(name)``) and, for LogSoftmax, its probabilities (``softmax_probs(name)``, an Exp
    of it): the Monte Carlo mean of the probabilities is what the compiled softmax output estimates."""
    for output in list(graph.output):
        node = final_softmax(graph, output.name)
        if node is not None:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
            if node.op_type == "LogSoftmax":
                graph.node.append(onnx.helper.make_node("Exp", [output.name], [softmax_probs(output.name)]))
                graph.output.append(onnx.helper.make_empty_tensor_value_info(softmax_probs(output.name)))


def softmax_probs(name: str) -> str:
    """The Monte Carlo output that holds the probabilities of the log-softmax output ``name``."""
    return f"{name}.pfpc_probs"


def compare(pfp, mc, floor: float = 0.0):
    """Distance between the PFP and MC moments of one output, as a dict of scalars.

    Relative errors divide by the MC variance (or std), floored at ``floor`` times the output's
    mean MC variance: a ReLU unit that almost never fires has an MC variance near 0, and its
    relative error says nothing about the approximation."""
    pfp_mean, pfp_var = (None if a is None else np.asarray(a, np.float64) for a in pfp)
    mc_mean, mc_var, stderr, var_stderr = mc
    if pfp_var is None:  # probabilities: a mean alone
        pfp_var = mc_var
    z = np.abs(pfp_mean - mc_mean) / np.maximum(stderr, 1e-12)
    var_scale = np.maximum(mc_var, max(floor * float(np.mean(mc_var)), 1e-30))
    mean_err = np.abs(pfp_mean - mc_mean) / np.sqrt(var_scale)
    var_err = np.abs(pfp_var - mc_var) / var_scale
    return {
        "mean_abs_err": float(np.max(np.abs(pfp_mean - mc_mean))),
        "mean_err_in_std": float(np.max(mean_err)),
        "mean_err_in_std_median": float(np.median(mean_err)),
        # aggregates over the output: units weighted by their spread, robust to near-constant units
        "mean_err_total": float(np.sum(np.abs(pfp_mean - mc_mean)) / max(np.sum(np.sqrt(mc_var)), 1e-30)),
        "mean_z_max": float(np.max(z)),
        "var_rel_err_median": float(np.median(var_err)),
        # which side: below 1 the PFP claims less spread than sampling (same floor as the errors)
        "var_ratio_median": float(np.median(pfp_var / var_scale)),
        "var_rel_err_max": float(np.max(var_err)),
        "var_err_total": float(np.sum(np.abs(pfp_var - mc_var)) / max(np.sum(mc_var), 1e-30)),
        "mc_var_stderr_total": float(np.sum(var_stderr) / max(np.sum(mc_var), 1e-30)),
        # the MC's own relative error of the variance: PFP errors at this level are MC noise
        "mc_var_rel_stderr_median": float(np.median(var_stderr / var_scale)),
    }


#: Nodes that only move values around: their output equals an earlier layer's, so per layer skips them.
VIEW_OPS = registry.onnx_ops(registry.Kind.VIEW)


#: Per layer, relative errors divide by at least this fraction of the layer's mean MC variance.
PER_LAYER_FLOOR = 1e-3


def per_layer(model: onnx.ModelProto, posterior: Posterior, inputs: dict, samples: int, seed: int = 0, progress: bool = False):
    """PFP vs Monte Carlo at every layer output of ``model`` (batch fixed), in graph order.

    The PFP of a layer output is the compiled C of the graph truncated there
    (``onnx.utils.Extractor``); the Monte Carlo moments of all layer outputs come from one
    sampling run of the graph with every layer output made a graph output. Returns one dict
    per layer: output, op and the `compare` distances (floored at `PER_LAYER_FLOOR`).
    """
    import tempfile

    from .compiler import compile as compile_model
    from .compiler import run_host

    # a final Softmax/LogSoftmax is no layer of its own: the PFP (and so the Monte Carlo run,
    # `_logits_as_outputs`) stops at its logits, which are the layer before it
    softmax_outputs = {node.output[0] for node in model.graph.node if node.op_type in registry.onnx_ops(registry.Kind.OUTPUT)} & {o.name for o in model.graph.output}
    layers = [(node.output[0], node.op_type) for node in model.graph.node
              if node.op_type not in VIEW_OPS and node.domain in ("", "ai.onnx") and node.output[0] not in softmax_outputs]
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    layers = [(name, op) for name, op in layers if name in known]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _logits_as_outputs(probe.graph)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(known[name] for name, _ in layers if name not in outputs)
    names, mc = monte_carlo(probe, posterior, inputs, samples, seed)
    mc_by_name = dict(zip(names, mc))
    extractor = onnx.utils.Extractor(model)
    rows = []
    iterator = layers
    if progress:
        from tqdm import tqdm

        iterator = tqdm(layers, desc="per-layer PFP", leave=False)
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, op) in enumerate(iterator):
            sub = extractor.extract_model(list(inputs), [name])
            kept = {init.name for init in sub.graph.initializer}
            sub_post = Posterior({k: v for k, v in posterior.means.items() if k in kept}, {k: v for k, v in posterior.variances.items() if k in kept})
            out = os.path.join(tmp, f"layer{index}")
            compile_model(sub, sub_post, out_dir=out)
            (pair,) = run_host(out, list(inputs.values()))
            rows.append({"output": name, "op": op, **compare(pair, mc_by_name[name], PER_LAYER_FLOOR)})
    return rows
