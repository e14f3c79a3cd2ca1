"""The one way pfpc opens an onnxruntime session (verify's Monte Carlo, bench's timers, rebatch's check)."""

from __future__ import annotations

import onnx


def ort_session(model: onnx.ModelProto, threads: int | None = None):
    """An onnxruntime CPU session of ``model`` that logs only errors (its warnings about unused
    initialisers would reach the user's terminal); ``threads`` pins intra- and inter-op threads
    (one for timings and for Monte Carlo that must not take the machine)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
