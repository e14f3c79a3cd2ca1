"""Bounded fuzzing of the ONNX and posterior loaders (hypothesis): random byte mutations of a valid
file and random changes of its fields. Property: a successful load or a one-line `PfpcError`,
never another exception type."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfpc.errors import PfpcError
from pfpc.frontends.onnx_model import load_model
from pfpc.frontends.posterior import load_posterior
from test_hostile_inputs import W, tiny_model

#: CI runs a fixed, bounded set (about 10 s); PFPC_FUZZ_EXAMPLES=N explores N fresh random examples per test
EXPLORE = int(os.environ.get("PFPC_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=EXPLORE or 120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not EXPLORE,
                    database=None)
VALID_MODEL = tiny_model(batch_dim="N").SerializeToString()


def _valid_posterior() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.npz")
        np.savez(path, **{"w.std": np.full_like(W, 0.1), "b.rho": np.zeros(3, np.float32), "b.mean": np.ones(3, np.float32)})
        with open(path, "rb") as handle:
            return handle.read()


VALID_POSTERIOR = _valid_posterior()


def _load(loader, data: bytes, suffix: str):
    """``loader(path)`` on ``data`` written to a file; returns the result or the PfpcError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz" + suffix)
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            return loader(path)
        except PfpcError as err:
            assert len(str(err).splitlines()) == 1 and str(err), repr(str(err))
            return err


def _mutate(data: bytes, edits) -> bytes:
    buffer = bytearray(data)
    for kind, position, value in edits:
        position %= max(len(buffer), 1)
        if kind == "set" and buffer:
            buffer[position] = value
        elif kind == "insert":
            buffer[position:position] = bytes([value]) * (1 + value % 4)
        elif kind == "delete":
            del buffer[position : position + 1 + value % 8]
        elif kind == "truncate":
            del buffer[position:]
    return bytes(buffer)


EDITS = st.lists(st.tuples(st.sampled_from(["set", "set", "insert", "delete", "truncate"]), st.integers(0, 1 << 20), st.integers(0, 255)),
                 min_size=1, max_size=6)


@SETTINGS
@given(edits=EDITS, batch=st.sampled_from([None, 1, 3]))
def test_model_loader_on_mutated_bytes(edits, batch):
    _load(lambda path: load_model(path, batch), _mutate(VALID_MODEL, edits), ".onnx")


def _change_field(model: onnx.ModelProto, draw):
    """One random change of a field a real exporter could get wrong."""
    graph = model.graph
    kind = draw(st.sampled_from(["op_type", "dim", "data_type", "raw_data", "opset", "ir_version", "node_input",
                                 "drop_node", "drop_initializer", "attribute", "elem_type", "dims", "output_name", "domain"]))
    integer = draw(st.integers(-3, 1 << 40))
    text = draw(st.sampled_from(["", "x", "w", "b", "h", "y", "Sin", "Relu", "Conv", "MaxPool", "Softmax", "Loop", "com.x", "\n*/", "é"]))
    node = graph.node[integer % len(graph.node)]
    init = graph.initializer[integer % len(graph.initializer)]
    if kind == "op_type":
        node.op_type = text
    elif kind == "dim":
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[integer % len(dims)].dim_value = integer % 7 - 2
    elif kind == "data_type":
        init.data_type = integer % 25
    elif kind == "raw_data":
        init.raw_data = init.raw_data[: integer % (len(init.raw_data) + 1)]
    elif kind == "opset":
        model.opset_import[0].version = integer % 30
    elif kind == "ir_version":
        model.ir_version = integer % 15
    elif kind == "node_input":
        node.input[integer % len(node.input)] = text
    elif kind == "drop_node":
        del graph.node[integer % len(graph.node)]
    elif kind == "drop_initializer":
        del graph.initializer[integer % len(graph.initializer)]
    elif kind == "attribute":
        node.attribute.append(onnx.helper.make_attribute(text or "axis", integer % 5 - 2))
    elif kind == "elem_type":
        graph.input[0].type.tensor_type.elem_type = integer % 17
    elif kind == "dims":
        init.dims[integer % len(init.dims)] = integer % 9 - 1
    elif kind == "output_name":
        graph.output[0].name = text
    else:
        node.domain = text


@SETTINGS
@given(data=st.data(), changes=st.integers(1, 3), batch=st.sampled_from([None, 2]))
def test_model_loader_on_changed_fields(data, changes, batch):
    model = onnx.ModelProto()
    model.ParseFromString(VALID_MODEL)
    for _ in range(changes):
        if not model.graph.node or not model.graph.initializer:
            break
        _change_field(model, data.draw)
    _load(lambda path: load_model(path, batch), model.SerializeToString(), ".onnx")


MODEL = tiny_model()


@SETTINGS
@given(edits=EDITS)
def test_posterior_loader_on_mutated_bytes(edits):
    _load(lambda path: load_posterior(MODEL, path), _mutate(VALID_POSTERIOR, edits), ".npz")


DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64, "U2", "S3", "V4", "M8[s]"]
VALUES = st.sampled_from([0.0, 0.1, -0.1, 1e-45, 1e30, 1e300, -1e300, np.nan, np.inf, -np.inf, 1000.0, -1000.0])


@SETTINGS
@given(entries=st.lists(st.tuples(
    st.sampled_from(["w", "b", "x", "y", "h", "", "w.std", "unknown"]),
    st.sampled_from(["std", "var", "logvar", "rho", "mean", "sigma", ""]),
    st.sampled_from(DTYPES),
    st.sampled_from([(4, 3), (3,), (3, 4), (), (0,), (4, 3, 1), (12,)]),
    VALUES), min_size=1, max_size=4))
def test_posterior_loader_on_random_arrays(entries):
    arrays = {}
    for tensor, kind, dtype, shape, value in entries:
        key = f"{tensor}.{kind}" if kind else tensor
        with np.errstate(all="ignore"):
            try:
                arrays[key] = np.full(shape, value).astype(dtype)
            except (TypeError, ValueError):
                arrays[key] = np.zeros(shape, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.npz")
        np.savez(path, **arrays)
        with open(path, "rb") as handle:
            data = handle.read()
    _load(lambda path: load_posterior(MODEL, path), data, ".npz")
