"""Kernel specifications: a chain of Gaussian operators compiled into one TIR PrimFunc.

A Gaussian call in the Relax IR is ``R.call_tir(kernel, args, out_sinfo)`` where ``kernel`` is a
PrimFunc carrying the attribute ``pfp.kernel``: the JSON of a `KernelSpec`. Passes rewrite the
spec (representations, fused stages) and emit the kernel again; every kernel that reaches code
generation was produced from the operator library in one place (`build_kernel`).

The passes read only a kernel's spec and signature, so they emit a `placeholder_kernel` (no body:
the spec, the operands' names and shapes, the output's shape); `build_placeholder` builds it once,
before code generation (`ir.build_kernels`). Building every emitted kernel took most of a long
graph's compile (1,000-node chain: 1,314 builds for the 375 kernels that reach code generation).

Arguments of a kernel, in order: for every Gaussian operand its mean and, unless the operand is
deterministic, its moment tensor (variance or second moment); then the output mean and, unless
the output is deterministic, the output moment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import tvm
from tvm import te, tirx

from . import codebook as CB
from . import gaussian as G
from . import registry as R
from .gaussian import Moment

#: The PrimFunc attribute holding a kernel's spec (read through `pfpc.ir_state.kernel_spec`).
KERNEL_ATTR = "pfp.kernel"
#: The attribute marking a `placeholder_kernel` (read through `pfpc.ir_state.is_placeholder`).
PLACEHOLDER_ATTR = "pfp.placeholder"

#: Stages that reduce over a fan-in (the ones that consume second moments cheaply and head fused kernels).
LINEAR_OPS = R.LINEAR_OPS


def arity(op: str, attrs: dict) -> int:
    """Gaussian operands of a stage: ``attrs["count"]`` for concat, two more (the weight's draw
    groups and noise coefficients) for a linear stage with ``draw_groups``, one more (the weights'
    second moments) for a convolution with ``weight_second``, else the registry's."""
    if op == "concat":
        return int(attrs["count"])
    return R.STAGES[op].arity + (2 if "draw_groups" in attrs else 0) + (1 if attrs.get("weight_second") else 0)


@dataclass(frozen=True, order=True)
class OnnxNode:
    """Provenance: the ONNX node an IR value or kernel stage comes from. ``name``: its name in
    the file, or ``<op_type>_<index>`` when it has none; ``index``: its position in the file."""

    index: int
    name: str
    op_type: str


@dataclass(frozen=True)
class KernelSpec:
    """``stages``: ((op, attrs), ...) applied in order; ``operands``: the representation of each
    Gaussian operand; ``output``: the representation the kernel writes. ``nodes``: per stage, the
    `OnnxNode`s it computes (provenance for names and comments; empty when unknown)."""

    stages: tuple
    operands: tuple
    output: str
    names: tuple = field(default=(), compare=False)
    nodes: tuple = field(default=(), compare=False)

    def to_json(self) -> str:
        data = {"stages": [[op, attrs] for op, attrs in self.stages], "operands": list(self.operands), "output": self.output}
        if self.nodes:
            data["nodes"] = [[[n.index, n.name, n.op_type] for n in stage] for stage in self.nodes]
        return json.dumps(data, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "KernelSpec":
        data = json.loads(text)
        nodes = tuple(tuple(OnnxNode(int(i), str(n), str(o)) for i, n, o in stage) for stage in data.get("nodes", ()))
        return KernelSpec(tuple((op, attrs) for op, attrs in data["stages"]), tuple(Moment(r) for r in data["operands"]),
                          Moment(data["output"]), nodes=nodes)

    def stage_nodes(self, index: int) -> tuple:
        """The `OnnxNode`s of stage ``index`` (none when the provenance is unknown)."""
        return self.nodes[index] if index < len(self.nodes) else ()

    def then(self, other: "KernelSpec", operands: tuple) -> "KernelSpec":
        """This kernel followed by ``other``'s stages (fusion), with its provenance."""
        nodes = ()
        if self.nodes or other.nodes:
            nodes = tuple(self.stage_nodes(i) for i in range(len(self.stages))) + tuple(other.stage_nodes(i) for i in range(len(other.stages)))
        return KernelSpec(self.stages + other.stages, operands, other.output, nodes=nodes)

    @property
    def ops(self):
        return [op for op, _ in self.stages]

    def operand_count(self) -> int:
        return arity(*self.stages[0]) + sum(arity(op, attrs) - 1 for op, attrs in self.stages[1:])

    def with_(self, **changes) -> "KernelSpec":
        return replace(self, **changes)

    def native_output(self) -> str:
        """The representation the last stage computes for free (``"none"`` if deterministic)."""
        return infer_output_repr(self)


def _native_repr(op, input_reprs):
    if all(r == Moment.NONE for r in input_reprs):
        return Moment.NONE
    native = R.STAGES[op].native
    return input_reprs[0] if native is None else native


def infer_output_repr(spec: KernelSpec) -> str:
    operands = list(spec.operands)
    current = None
    for index, (op, attrs) in enumerate(spec.stages):
        take = arity(op, attrs) - (0 if index == 0 else 1)
        reprs = ([] if index == 0 else [current]) + operands[:take]
        operands = operands[take:]
        current = _native_repr(op, reprs)
    return current


#: build_kernel's results by everything they depend on: every pass that rewrites `main` emits
#: its kernels again (`ir.ModuleBuilder.emit`), mostly unchanged, and TE's create_prim_func was
#: then a third of the compile time (500-node chain: 1,568 builds of 188 kernels). PrimFuncs are
#: immutable, so a cached one can be returned as it is.
_BUILT: dict = {}
_BUILT_LIMIT = 20000


def build_kernel(spec: KernelSpec, operand_shapes, name: str, codebooks=None):
    """Build the PrimFunc of ``spec`` for operands of the given shapes; returns it and the output shape.

    ``codebooks``: operand position -> `codebook.CodebookLayout` for weight operands passed as
    codebooks (their parameters are `codebook.placeholders`, gathered inside the kernel)."""
    if codebooks:
        return _build_kernel(spec, operand_shapes, name, codebooks)
    func, out_shape = _cached(_BUILT, spec, operand_shapes, name, _build_kernel)
    return func, list(out_shape)


def _cached(cache: dict, spec: KernelSpec, operand_shapes, name: str, make):
    """``make(spec, shapes, name)`` once per (spec, names, shapes, name) in ``cache``, which is
    emptied when it holds _BUILT_LIMIT entries."""
    shapes = tuple(tuple(int(d) for d in shape) for shape in operand_shapes)
    key = (spec.to_json(), spec.names, shapes, name)
    if key not in cache:
        if len(cache) >= _BUILT_LIMIT:
            cache.clear()
        cache[key] = make(spec, shapes, name)
    return cache[key]


#: Output shapes by stages (ONNX provenance aside) and operand shapes: a pass that changes only
#: representations keeps them (`placeholder_kernel`).
_OUT_SHAPES: dict = {}
#: placeholder_kernel's results by build_kernel's key (PrimFuncs are immutable).
_PLACEHOLDERS: dict = {}


def placeholder_kernel(spec: KernelSpec, operand_shapes, name: str):
    """What `build_kernel` returns, without the kernel's body: a PrimFunc with the built kernel's
    operand parameters (names, shapes), one parameter per output tensor, the spec and the name,
    and the output shape. Its body calls an undefined C function (a placeholder that reached a
    C compiler unbuilt fails to link); `build_placeholder` builds the kernel it stands for."""
    func, out_shape = _cached(_PLACEHOLDERS, spec, operand_shapes, name, _placeholder)
    return func, list(out_shape)


def _placeholder(spec: KernelSpec, shapes, name: str):
    if len(shapes) != spec.operand_count() or len(spec.operands) != len(shapes):
        raise ValueError(f"{name}: {len(shapes)} operands for a kernel that takes {spec.operand_count()}")
    shape_key = (json.dumps([[op, attrs] for op, attrs in spec.stages], sort_keys=True), shapes)
    if shape_key not in _OUT_SHAPES:
        if len(_OUT_SHAPES) >= _BUILT_LIMIT:
            _OUT_SHAPES.clear()
        _, outputs = _compute(spec, shapes, name)
        _OUT_SHAPES[shape_key] = tuple(int(d) for d in outputs[0].shape)
    out_shape = _OUT_SHAPES[shape_key]
    names = spec.names or tuple(f"in{i}" for i in range(len(shapes)))
    params = []
    for shape, rep, base in zip(shapes, spec.operands, names):
        params += [tirx.decl_buffer(shape, "float32", f"{base}_{role}") for role in ["mean"] + ([] if rep == Moment.NONE else [rep])]
    params += [tirx.decl_buffer(out_shape, "float32", f"out_{role}")
               for role in ["mean"] + ([] if spec.output == Moment.NONE else [spec.output])]
    body = tirx.Evaluate(tirx.call_extern("int32", "pfpc_unbuilt_kernel"))  # impure, as a built kernel's type says
    func = tirx.PrimFunc(params, body).with_attr("global_symbol", name).with_attr(KERNEL_ATTR, spec.to_json())
    return func.with_attr(PLACEHOLDER_ATTR, True), out_shape


def is_placeholder(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and PLACEHOLDER_ATTR in func.attrs


def build_placeholder(func):
    """The kernel a `placeholder_kernel` stands for (any other function as it is)."""
    if not is_placeholder(func):
        return func
    spec = KernelSpec.from_json(str(func.attrs[KERNEL_ATTR]))
    names, shapes, index = [], [], 0
    for rep in spec.operands:
        param = func.params[index]
        names.append(str(param.name).removesuffix("_mean"))
        shapes.append([int(d) for d in param.shape])
        index += 1 if rep == Moment.NONE else 2
    built, _ = build_kernel(spec.with_(names=tuple(names)), shapes, str(func.attrs["global_symbol"]))
    return built


def _compute(spec: KernelSpec, operand_shapes, name: str, codebooks=None):
    """The TE parameters and output tensors of ``spec`` (`build_kernel`)."""
    if len(operand_shapes) != spec.operand_count() or len(spec.operands) != len(operand_shapes):
        raise ValueError(f"{name}: {len(operand_shapes)} operands for a kernel that takes {spec.operand_count()}")
    names = spec.names or tuple(f"in{i}" for i in range(len(operand_shapes)))
    codebooks = codebooks or {}
    params, operands = [], []
    for position, (shape, rep, base) in enumerate(zip(operand_shapes, spec.operands, names)):
        roles = ["mean"] + ([] if rep == Moment.NONE else [rep])
        if position in codebooks:
            stored = CB.placeholders(base, shape, codebooks[position], roles)
            params += stored
            gathered = CB.operand(shape, codebooks[position], stored, roles) + [None]
            operands.append(G.Gaussian(gathered[0], gathered[1], rep))
            continue
        mean = te.placeholder([int(d) for d in shape], "float32", name=f"{base}_mean")
        moment = None if rep == Moment.NONE else te.placeholder([int(d) for d in shape], "float32", name=f"{base}_{rep}")
        params += [mean] + ([moment] if moment is not None else [])
        operands.append(G.Gaussian(mean, moment, rep))
    result, in_place = None, set()
    for index, (op, attrs) in enumerate(spec.stages):
        take = arity(op, attrs) - (0 if index == 0 else 1)
        inputs = ([] if index == 0 else [result]) + operands[:take]
        operands = operands[take:]
        if op not in R.STAGES:
            raise ValueError(f"unknown Gaussian operator {op}")
        result = R.STAGES[op].build(inputs, attrs)
        if index == 0:  # element-wise stages keep this shape: the output's
            in_place = set(in_place_operands(spec, operand_shapes, result.shape).values())
        if index in in_place and (index > 0 or result.repr != Moment.NONE):
            # a deterministic output is one store per element, after all its reads: nothing to materialise
            result = _materialised(result, apart=index == 0)
    if spec.output != result.repr:
        if spec.output == Moment.NONE:
            raise ValueError(f"{name}: output asked deterministic but the kernel computes a variance")
        result = G.convert(result, spec.output)
    outputs = [result.mean] + ([result.moment] if result.repr != Moment.NONE else [])
    taken = set(params)
    outputs = [  # an output that is an input as such (a pass-through) or a materialised stage still needs its own buffer
        _copy(t) if t in taken or G.SHARED_ATTR in (getattr(t.op, "attrs", None) or {}) else t for t in outputs
    ]
    return params, outputs


def _build_kernel(spec: KernelSpec, operand_shapes, name: str, codebooks=None):
    params, outputs = _compute(spec, operand_shapes, name, codebooks)
    func = te.create_prim_func(params + outputs)  # the algorithm; codegen schedules it for the target
    # a formula used twice in one expression repeats its `moments._let` locals: rename them apart
    func = tvm.tirx.transform.ConvertSSA()(tvm.IRModule({"main": func}))["main"]
    func = func.with_attr("global_symbol", name).with_attr(KERNEL_ATTR, spec.to_json())
    return func, [int(d) for d in outputs[0].shape]


def in_place_operands(spec: KernelSpec, operand_shapes, out_shape) -> dict[int, int]:
    """{operand position: stage index} of the operands the kernel may overwrite with its output
    (the memory plan then gives both the same bytes: `codegen.program.plan_arena`; which output
    tensor takes over which operand tensor: `in_place_pairs`).

    Such an operand enters a stage from which on every stage is element-wise
    (`registry.elementwise_stages`: a residual added in a linear kernel's epilogue, or any operand
    of a kernel of element-wise stages only), and it has the output's shape, so output element i
    depends on operand element i alone; and it is a feature map (rank 3 or more): a dense layer's
    bias at batch 1 has the output's shape too, and computing its sum apart costs a store and a
    load per output (seed MLP on Cortex-M4: +1.2 % instructions). A Gaussian operand pairs with a
    Gaussian output (mean over mean, moment over moment); a deterministic one with either output.
    Where the output is Gaussian, `build_kernel` computes the stage the operand enters as a
    `gaussian.SHARED` stage (`_materialised`), which the schedule evaluates for a block of outputs
    before it stores any of them: every element of the operand is read before its bytes are
    written (a deterministic output is one store per element, after its reads).
    """
    elementwise = R.elementwise_stages()
    ops = spec.ops
    if len(operand_shapes) != spec.operand_count():
        return {}
    out_shape = [int(d) for d in out_shape]
    if len(out_shape) < 3:
        return {}
    found, position = {}, 0
    for index in range(len(ops)):
        take = arity(*spec.stages[index]) - (0 if index == 0 else 1)
        if all(op in elementwise for op in ops[index:]):
            for offset in range(take):
                stochastic = spec.operands[position + offset] != Moment.NONE
                if stochastic and spec.output == Moment.NONE:
                    continue  # its two tensors have one output tensor to pair with
                if [int(d) for d in operand_shapes[position + offset]] == out_shape:
                    found[position + offset] = index
        position += take
    return found


def in_place_pairs(spec: KernelSpec, operand_shapes, out_shape) -> list:
    """[(operand position, its tensor (0 mean, 1 moment), output tensor (0 mean, 1 moment))] that
    may share bytes (`in_place_operands`): a Gaussian operand's mean and moment over the output's;
    a deterministic operand over the output's moment when it feeds the variance alone
    (``add_variance``, the covariance form's coherent term), else over its mean."""
    pairs = []
    for position, index in in_place_operands(spec, operand_shapes, out_shape).items():
        if spec.operands[position] != Moment.NONE:
            pairs += [(position, 0, 0), (position, 1, 1)]
        else:
            feeds_variance = spec.output != Moment.NONE and spec.ops[index] == "add_variance"
            pairs.append((position, 0, 1 if feeds_variance else 0))
    return pairs


def _copy(tensor: te.Tensor) -> te.Tensor:
    return te.compute(tensor.shape, lambda *i: tensor[i], name=f"copy_{tensor.name}")


#: Name of a materialised first stage (`_materialised`): its output copies stay blocks of their own.
IN_PLACE_APART = "in_place_apart"


def _materialised(g: G.Gaussian, apart: bool = False) -> G.Gaussian:
    """``g`` computed in a `gaussian.SHARED` stage of its own (scalars or a row of them, never
    inlined into the stages that read it): see `in_place_operands`. ``apart``: the kernel's first
    stage, whose output copies `schedule_kernel` keeps apart (inlined into it, the mean would be
    stored before the variance, which may read the operand's mean, is computed)."""
    name = IN_PLACE_APART if apart else "in_place"
    if g.moment is None:
        mean = te.compute(g.mean.shape, lambda *i: g.mean[i], name=f"{name}_mean", attrs=G.SHARED)
        return G.Gaussian(mean, None, g.repr)
    mean, moment = te.compute(g.mean.shape, lambda *i: (g.mean[i], g.moment[i]), name=name, attrs=G.SHARED)
    return G.Gaussian(mean, moment, g.repr)
