"""Recurrent cells (ONNX LSTM and GRU) unrolled over their static sequence length into
operators pfpc already propagates, before the Relax import.

For one direction of an LSTM over T steps (gates i, o, f, c in ONNX's row order)::

    X [T, B, I] --Reshape--> [T*B, I] --Gemm(W_d, Wb_d + Rb_d)--> [T*B, 4H] --Split(T)--> XW_0 .. XW_{T-1}
    step t:  pre = XW_t + Gemm(H_{t-1}, R_d)          (no recurrent term at the first step
             [Clip(pre, -clip, clip)]                  without an initial state)
             i, o, f, c = Split(pre, 4)
             C_t = Sigmoid(f) * C_{t-1} + Sigmoid(i) * Tanh(c)
             H_t = Sigmoid(o) * Tanh(C_t)
    Y = Concat(Reshape(H_t)), Y_h = H_{T-1}, Y_c = C_{T-1}  (step order reversed for reverse)

and for a GRU (gates z, r, h)::

    z = Sigmoid(XW_z + H R_z),  r = Sigmoid(XW_r + H R_r)
    h~ = Tanh(XW_h + r * (H R_h + Rb_h))      linear_before_reset = 1
    h~ = Tanh(XW_h + (r * H) R_h)              linear_before_reset = 0 (Rb_h in XW's bias)
    H_t = Sigmoid(-(XW_z + H R_z)) * h~ + z * H_{t-1}      (1 - sigmoid(a) = sigmoid(-a))

The weights become initializers per direction, transposed (``<W>.forward`` = W[0]^T,
``<W>.reverse``; GRU's R split into ``.zr`` and ``.h`` when linear_before_reset = 0; the two
biases of a gate summed into one, the variances adding: independent Gaussians), with their
posterior moments sliced alike; every step reads the same one.
The PFP then treats every gate and every step as independent Gaussians (the VarRNN-style
moment matching): the weights shared across steps correlate them in the Monte Carlo, an error
that grows with T (docs/supported_operators.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import PfpcError
from ..ops import registry as R
from .onnx_model import value_shapes
from .posterior import Posterior

DIRECTIONS = {"forward": ("forward",), "reverse": ("reverse",), "bidirectional": ("forward", "reverse")}


def unroll_recurrent(model: onnx.ModelProto, posterior: Posterior, name: str) -> tuple[onnx.ModelProto, Posterior]:
    """``model`` with every recurrent node the registry accepts unrolled, and ``posterior``
    with the per-direction weights it made; both unchanged when there is none. Nodes the
    registry refuses stay, for `check_supported` to list with the others."""
    recurrent = R.onnx_ops(R.Kind.UNROLLED)
    chosen = {index for index, node in enumerate(model.graph.node) if node.op_type in recurrent and node.domain in ("", "ai.onnx")
              and R.unsupported_reason(node, _attrs(node), None) is None}
    nodes = [model.graph.node[index] for index in sorted(chosen)]
    if not nodes:
        return model, posterior
    if posterior.shared is not None:
        shared = sorted(set(posterior.shared.tensors) & {i for node in nodes for i in node.input[1:4]})
        if shared:
            raise PfpcError(f"{name}: recurrent weight '{shared[0]}' has a shared (codebook) posterior: not supported")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    unroller = _Unroller(copy, posterior, name)
    rebuilt = []
    for index, node in enumerate(graph.node):
        if index in chosen:
            rebuilt.extend(unroller.unroll(node))
        else:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(unroller.initializers)
    _drop_dead(graph)
    means = {**posterior.means, **unroller.means}
    variances = {**posterior.variances, **unroller.variances}
    return copy, Posterior(means, variances, posterior.shared)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset(model) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _drop_dead(graph) -> None:
    """Remove the nodes no output depends on any more (the shape arithmetic of the initial
    states) and the initializers nothing reads (the original W, R, B)."""
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output if out):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


class _Unroller:
    def __init__(self, model, posterior, name):
        self.posterior, self.name = posterior, name
        self.opset = _opset(model)
        self.constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        self.shapes = value_shapes(model.graph)
        taken = {out for node in model.graph.node for out in node.output} | set(self.constants) | {v.name for v in model.graph.input}
        self.taken = taken
        self.initializers, self.means, self.variances = [], {}, {}
        self.nodes = []

    # --- naming and emitting -----------------------------------------------------------
    def fresh(self, base):
        candidate, index = base, 1
        while candidate in self.taken:
            candidate, index = f"{base}_{index}", index + 1
        self.taken.add(candidate)
        return candidate

    def emit(self, op_type, inputs, outputs=1, **attrs):
        names = [self.fresh(f"{self.label}/{op_type}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(f"{self.label}/{op_type}_node"), **attrs))
        return names if outputs > 1 else names[0]

    def constant(self, base, value):
        """A deterministic constant initializer (shapes)."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, base, mean, var):
        """A weight initializer with its posterior moments (``var`` None: deterministic)."""
        name = self.fresh(base)
        mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(mean, name))
        self.means[name] = mean
        if var is not None and np.any(var):
            self.variances[name] = np.ascontiguousarray(var, dtype=np.float32)
        return name

    def reshape(self, x, shape):
        return self.emit("Reshape", [x, self.constant(f"{self.label}/shape", np.array(shape, np.int64))])

    def split(self, x, count, axis):
        if count == 1:
            return [x]
        return self.emit("Split", [x], outputs=count, axis=axis)

    def concat(self, parts, axis):
        return parts[0] if len(parts) == 1 else self.emit("Concat", parts, axis=axis)

    def clip(self, x):
        if self.clip_bound is None:
            return x
        if self.opset < 11:
            return self.emit("Clip", [x], min=-self.clip_bound, max=self.clip_bound)
        bounds = [self.constant(f"{self.label}/clip", np.array(v, np.float32)) for v in (-self.clip_bound, self.clip_bound)]
        return self.emit("Clip", [x, *bounds])

    def gemm(self, x, weight, bias=None):
        """x W^T (+ bias) with W^T stored transposed: a Gemm with transB would make TVM's importer
        transpose the shared weight once per step, which `FoldWeightLayout` folds into a copy per step
        (flash, and independent draws per step in the sampling build)."""
        return self.emit("Gemm", [x, weight] + ([bias] if bias else []))

    def transposed_weight(self, base, mean, var):
        return self.weight(base, mean.T, var.T)

    # --- tensors of the node ---------------------------------------------------------------
    def refuse(self, why):
        raise PfpcError(f"{self.name}: {self.node.op_type} node '{self.label}': {why}")

    def value(self, tensor, depth=0):
        """The value of ``tensor`` when it is a constant or computed from constants alone
        (torch's exporter makes zero initial states with Shape/Concat/Expand), else None."""
        if tensor in self.constants:
            return self.constants[tensor]
        node = self.producers.get(tensor)
        if node is None or depth > 16:
            return None
        if node.op_type == "Shape":
            shape = self.shapes.get(node.input[0])
            if shape is None or None in shape:
                return None
            inputs = {node.input[0]: np.zeros(shape, np.float32)}
        else:
            inputs = {}
            for name in node.input:
                if name:
                    inputs[name] = self.value(name, depth + 1)
                    if inputs[name] is None:
                        return None
        from onnx.reference import ReferenceEvaluator

        try:
            results = ReferenceEvaluator(node).run(None, inputs)
        except Exception:
            return None
        return np.asarray(results[list(node.output).index(tensor)])

    def moments(self, tensor):
        mean = self.posterior.means.get(tensor)
        if mean is None:
            self.refuse(f"weight '{tensor}' is not a float32 initializer")
        return np.asarray(mean, np.float64), self.posterior.variances.get(tensor)

    def initial_state(self, index, what):
        """The initial state input: None when absent or all zero, else the tensor (a Gaussian
        activation, e.g. a streaming model's state input)."""
        if index >= len(self.node.input) or not self.node.input[index]:
            return None
        tensor = self.node.input[index]
        if tensor in self.posterior.variances:
            self.refuse(f"{what} '{tensor}' has a posterior variance: a learned initial state is not supported")
        value = self.value(tensor)
        if value is None:
            if tensor in self.posterior.means:
                self.refuse(f"{what} '{tensor}' is a weight: give the initial state as an input or leave it out")
            return tensor
        if np.any(value != 0):
            self.refuse(f"{what} '{tensor}' is a non-zero constant: give it as an input or leave it out")
        return None

    # --- the unrolling ---------------------------------------------------------------------
    def unroll(self, node):
        self.node, self.label, self.nodes = node, node.name or f"{node.op_type}_{node.output[0]}", []
        attrs = _attrs(node)
        self.clip_bound = float(attrs["clip"]) if "clip" in attrs else None
        layout = int(attrs.get("layout", 0))
        hidden = int(attrs["hidden_size"]) if "hidden_size" in attrs else None
        direction = attrs.get("direction", b"forward")
        directions = DIRECTIONS.get(direction.decode() if isinstance(direction, bytes) else direction)
        if directions is None:
            self.refuse(f"direction '{direction}' is not forward, reverse or bidirectional")
        x = node.input[0]
        shape = self.shapes.get(x)
        if shape is None or len(shape) != 3 or None in shape:
            self.refuse(f"input '{x}' has no static shape [sequence, batch, features]: pfpc unrolls a static sequence length")
        steps, batch, features = (shape[0], shape[1], shape[2]) if layout == 0 else (shape[1], shape[0], shape[2])
        gates = 4 if node.op_type == "LSTM" else 3
        w_mean, w_var = self.moments(node.input[1])
        r_mean, r_var = self.moments(node.input[2])
        hidden = hidden or w_mean.shape[1] // gates
        if w_mean.shape != (len(directions), gates * hidden, features) or r_mean.shape != (len(directions), gates * hidden, hidden):
            self.refuse(f"W {list(w_mean.shape)} and R {list(r_mean.shape)} do not match {len(directions)} direction(s), "
                        f"hidden_size {hidden} and {features} input features")
        if len(node.input) > 3 and node.input[3]:
            b_mean, b_var = self.moments(node.input[3])
            if b_mean.shape != (len(directions), 2 * gates * hidden):
                self.refuse(f"B {list(b_mean.shape)} is not [{len(directions)}, {2 * gates * hidden}]")
        else:
            b_mean, b_var = np.zeros((len(directions), 2 * gates * hidden)), None
        if b_var is None:
            b_var = np.zeros_like(b_mean)
        w_var = np.zeros_like(w_mean) if w_var is None else w_var
        r_var = np.zeros_like(r_mean) if r_var is None else r_var
        if len(node.input) > 4 and node.input[4]:
            lengths = self.value(node.input[4])
            if lengths is None or np.any(lengths != steps):
                self.refuse(f"sequence_lens '{node.input[4]}' is not the constant {steps} for every sequence: "
                            "pfpc unrolls a static sequence length")
        initial_h = self.initial_state(5, "initial_h")
        initial_c = self.initial_state(6, "initial_c") if node.op_type == "LSTM" else None
        # the input as [T*B, I], time major
        if layout == 1:
            x = self.emit("Transpose", [x], perm=[1, 0, 2])
        flat = self.reshape(x, [steps * batch, features])
        state_axis = 0 if layout == 0 else 1  # of Y_h / Y_c: [D, B, H] or [B, D, H]
        outputs_y, outputs_h, outputs_c = [], [], []
        for d, direction in enumerate(directions):
            weights = (w_mean[d], w_var[d], r_mean[d], r_var[d], b_mean[d], b_var[d])
            h0, c0 = (None if value is None else self.reshape(self.split(value, len(directions), state_axis)[d], [batch, hidden])
                      for value in (initial_h, initial_c))
            cell = self.lstm if node.op_type == "LSTM" else self.gru
            per_step, last_h, last_c = cell(flat, steps, hidden, direction, weights, h0, c0, attrs)
            if layout == 0:
                outputs_y.append(self.concat([self.reshape(h, [1, 1, batch, hidden]) for h in per_step], 0))
            else:
                outputs_y.append(self.concat([self.reshape(h, [batch, 1, 1, hidden]) for h in per_step], 1))
            outputs_h.append(self.reshape(last_h, [1, batch, hidden] if layout == 0 else [batch, 1, hidden]))
            if last_c is not None:
                outputs_c.append(self.reshape(last_c, [1, batch, hidden] if layout == 0 else [batch, 1, hidden]))
        results = [self.concat(outputs_y, 1 if layout == 0 else 2), self.concat(outputs_h, state_axis)]
        if node.op_type == "LSTM":
            results.append(self.concat(outputs_c, state_axis))
        for result, wanted in zip(results, node.output):
            if wanted:
                self.nodes.append(helper.make_node("Identity", [result], [wanted], name=self.fresh(f"{self.label}/output")))
        return self.nodes

    def input_projection(self, flat, steps, direction, w_mean, w_var, bias_mean, bias_var):
        """X W^T + bias for every step at once, split per step in the order the cell runs."""
        w = self.transposed_weight(f"{self.node.input[1]}.{direction}", w_mean, w_var)
        b = self.weight(f"{self.node.input[1]}.{direction}.bias", bias_mean, bias_var)
        per_step = self.split(self.gemm(flat, w, b), steps, 0)
        order = range(steps) if direction == "forward" else range(steps - 1, -1, -1)
        return [(t, per_step[t]) for t in order]

    def lstm(self, flat, steps, hidden, direction, weights, h, c, attrs):
        """ONNX LSTM, gates i, o, f, c: C_t = f C_{t-1} + i c~, H_t = o tanh(C_t)."""
        w_mean, w_var, r_mean, r_var, b_mean, b_var = weights
        gates = 4 * hidden
        projected = self.input_projection(flat, steps, direction, w_mean, w_var,
                                          b_mean[:gates] + b_mean[gates:], b_var[:gates] + b_var[gates:])
        r = self.transposed_weight(f"{self.node.input[2]}.{direction}", r_mean, r_var)
        out = [None] * steps
        for t, pre in projected:
            if h is not None:
                pre = self.emit("Add", [pre, self.gemm(h, r)])
            i, o, f, g = self.split(self.clip(pre), 4, 1)
            cell = self.emit("Mul", [self.emit("Sigmoid", [i]), self.emit("Tanh", [g])])
            if c is not None:
                cell = self.emit("Add", [self.emit("Mul", [self.emit("Sigmoid", [f]), c]), cell])
            c = cell
            h = self.emit("Mul", [self.emit("Sigmoid", [o]), self.emit("Tanh", [c])])
            out[t] = h
        return out, h, c

    def gru(self, flat, steps, hidden, direction, weights, h, c, attrs):
        """ONNX GRU, gates z, r, h: H_t = (1 - z) h~ + z H_{t-1}."""
        w_mean, w_var, r_mean, r_var, b_mean, b_var = weights
        before_reset = int(attrs.get("linear_before_reset", 0))
        n = 3 * hidden
        wb_mean, rb_mean, wb_var, rb_var = b_mean[:n], b_mean[n:], b_var[:n], b_var[n:]
        # XW's bias: both biases of z and r; of h only Wb_h when the reset gate multiplies Rb_h
        bias_mean, bias_var = wb_mean + rb_mean, wb_var + rb_var
        if before_reset:
            bias_mean[2 * hidden:], bias_var[2 * hidden:] = wb_mean[2 * hidden:], wb_var[2 * hidden:]
        projected = self.input_projection(flat, steps, direction, w_mean, w_var, bias_mean, bias_var)
        recurrent_bias = candidate_bias = None
        bias_name = self.node.input[3] if len(self.node.input) > 3 and self.node.input[3] else None
        if before_reset:
            r_all = self.transposed_weight(f"{self.node.input[2]}.{direction}", r_mean, r_var)
            if bias_name:  # Rb_h inside the reset gate's product; zeros for z and r
                zeros = np.zeros(2 * hidden)
                recurrent_bias = self.weight(f"{bias_name}.{direction}.recurrent", np.concatenate([zeros, rb_mean[2 * hidden:]]),
                                             np.concatenate([zeros, rb_var[2 * hidden:]]))
                candidate_bias = self.weight(f"{bias_name}.{direction}.h", rb_mean[2 * hidden:], rb_var[2 * hidden:])
        else:
            r_gates = self.transposed_weight(f"{self.node.input[2]}.{direction}.zr", r_mean[:2 * hidden], r_var[:2 * hidden])
            r_candidate = self.transposed_weight(f"{self.node.input[2]}.{direction}.h", r_mean[2 * hidden:], r_var[2 * hidden:])
        out = [None] * steps
        for t, pre in projected:
            pre_z, pre_r, pre_h = self.split(pre, 3, 1)
            if h is not None:
                if before_reset:
                    rec_z, rec_r, rec_h = self.split(self.gemm(h, r_all, recurrent_bias), 3, 1)
                else:
                    rec_z, rec_r = self.split(self.gemm(h, r_gates), 2, 1)
                pre_z = self.emit("Add", [pre_z, rec_z])
                pre_r = self.emit("Add", [pre_r, rec_r])
            pre_z, pre_r = self.clip(pre_z), self.clip(pre_r)
            reset = self.emit("Sigmoid", [pre_r])
            if before_reset and (h is not None or candidate_bias is not None):
                gated = self.emit("Mul", [reset, rec_h if h is not None else candidate_bias])
                pre_h = self.emit("Add", [pre_h, gated])
            elif h is not None:
                pre_h = self.emit("Add", [pre_h, self.gemm(self.emit("Mul", [reset, h]), r_candidate)])
            candidate = self.emit("Tanh", [self.clip(pre_h)])
            keep_new = self.emit("Sigmoid", [self.emit("Neg", [pre_z])])
            new = self.emit("Mul", [keep_new, candidate])
            if h is not None:
                new = self.emit("Add", [new, self.emit("Mul", [self.emit("Sigmoid", [pre_z]), h])])
            h = new
            out[t] = h
        return out, h, None
