"""Monte Carlo ground truth: sample weights from the posterior, run the mean network's graph in
onnxruntime once per sample, and compare the sample moments with the compiled PFP."""

from __future__ import annotations

import numpy as np
import onnx

from .frontends.posterior import Posterior


def sampling_session(model: onnx.ModelProto, posterior: Posterior):
    """An onnxruntime session of the mean network whose stochastic initializers are graph
    inputs, so each run can be fed one draw of the weights; returns (session, stochastic names)."""
    import onnxruntime as ort

    stochastic = sorted(posterior.variances)
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    kept = [init for init in graph.graph.initializer if init.name not in stochastic]
    shapes = {init.name: list(init.dims) for init in graph.graph.initializer}
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for name in stochastic:
        graph.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes[name]))
    _logits_as_outputs(graph.graph)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"]), stochastic


def monte_carlo(model: onnx.ModelProto, posterior: Posterior, inputs: dict, samples: int, seed: int = 0):
    """Per output: (sample mean, sample variance, standard error of the mean)."""
    session, stochastic = sampling_session(model, posterior)
    rng = np.random.default_rng(seed)
    names = [o.name for o in session.get_outputs()]
    total = [0.0] * len(names)
    total_sq = [0.0] * len(names)
    stds = {name: np.sqrt(posterior.variances[name].astype(np.float64)) for name in stochastic}
    for _ in range(samples):
        feed = dict(inputs)
        for name in stochastic:
            mean = posterior.means[name].astype(np.float64)
            feed[name] = (mean + stds[name] * rng.standard_normal(mean.shape)).astype(np.float32)
        for index, value in enumerate(session.run(names, feed)):
            value = value.astype(np.float64)
            total[index] = total[index] + value
            total_sq[index] = total_sq[index] + value * value
    results = []
    for index in range(len(names)):
        mean = total[index] / samples
        var = np.maximum(total_sq[index] / samples - mean * mean, 0.0) * samples / max(samples - 1, 1)
        results.append((mean, var, np.sqrt(var / samples)))
    return names, results


def _logits_as_outputs(graph):
    """An output computed by a final Softmax/LogSoftmax becomes that node's input: the compiled
    PFP returns the logits' moments there (see substitute_layers), so MC samples the logits."""
    producer = {node.output[0]: node for node in graph.node}
    for output in graph.output:
        node = producer.get(output.name)
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            graph.node.remove(node)
            output.name = node.input[0]


def compare(pfp, mc):
    """Distance between the PFP and MC moments of one output, as a dict of scalars."""
    pfp_mean, pfp_var = (np.asarray(a, np.float64) for a in pfp)
    mc_mean, mc_var, stderr = mc
    z = np.abs(pfp_mean - mc_mean) / np.maximum(stderr, 1e-12)
    scale = np.sqrt(np.maximum(mc_var, 1e-30))
    return {
        "mean_abs_err": float(np.max(np.abs(pfp_mean - mc_mean))),
        "mean_err_in_std": float(np.max(np.abs(pfp_mean - mc_mean) / scale)),
        "mean_z_max": float(np.max(z)),
        "var_rel_err_median": float(np.median(np.abs(pfp_var - mc_var) / np.maximum(mc_var, 1e-30))),
        "var_rel_err_max": float(np.max(np.abs(pfp_var - mc_var) / np.maximum(mc_var, 1e-30))),
    }
