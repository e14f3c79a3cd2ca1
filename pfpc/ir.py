"""Small helpers shared by the passes: reading the main function, its weights, its kernels."""

from __future__ import annotations

import tvm
from tvm import relax

from . import ir_state
from .ops.gaussian import Moment
from .ops.constants import constant_value, scalar_value  # noqa: F401  (re-exported for the passes)
from .ops.kernel import KernelSpec, build_placeholder, is_placeholder, placeholder_kernel


def main_bindings(func: relax.Function):
    """The bindings of the function body, in order (all passes keep one dataflow block)."""
    return [binding for block in func.body.blocks for binding in block.bindings]


def output_fields(func: relax.Function) -> list:
    """The fields of the tuple ``main`` returns: (mean, moment) per output, then any extra outputs."""
    body = func.body.body
    for binding in main_bindings(func):
        if isinstance(binding.value, relax.Tuple) and binding.var.same_as(body):
            return list(binding.value.fields)
    return list(body.fields)


def shape_of(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def output_shape(var) -> list[int]:
    """The shape of a kernel call's first output (its mean's, where it returns mean and moment)."""
    ty = var.ty.fields[0] if isinstance(var.ty, relax.TupleType) else var.ty
    return [int(d) for d in ty.shape]


def call_op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def kernel_of(mod: tvm.IRModule, expr) -> tuple[KernelSpec, tvm.ir.GlobalVar] | None:
    """The spec of a Gaussian kernel call ``R.call_tir(kernel, ...)``, else None."""
    if call_op_name(expr) != "relax.call_tir":
        return None
    gvar = expr.args[0]
    spec = ir_state.kernel_spec(mod[gvar])
    return None if spec is None else (spec, gvar)


class GaussianValue:
    """A Gaussian tensor during rewriting: mean expression, moment expression, representation."""

    __slots__ = ("mean", "moment", "repr")

    def __init__(self, mean, moment=None, repr=Moment.NONE):
        self.mean, self.moment, self.repr = mean, moment, Moment(repr)

    def args(self):
        return [self.mean] + ([self.moment] if self.repr != Moment.NONE else [])


def _weight_stem(name: str) -> str:
    """'conv1.weight.permute_dims' -> 'conv1'; 'fc.bias' -> 'fc'."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part in ("weight", "bias", "kernel", "var", "second_moment") and index > 0:
            return "_".join(parts[:index])
    return name


def kernel_label(ops, operands, weight_names) -> str:
    """A readable kernel name: the layer (from its first weight) and the operators it runs."""
    layer = next((_weight_stem(o.mean.name) for o in operands if isinstance(o.mean, relax.Var) and o.mean.name in weight_names), None)
    return "_".join(([layer] if layer else []) + list(ops))


def operand_names(operands, weight_names, initializers=None) -> list[str]:
    """Kernel parameter names: weights by the ONNX initializer they come from (``initializers``:
    `ir_state.onnx_names`; else by parameter name), activations x, x1, ...; distinct ASCII
    identifiers (the kernel's C parameters are these plus _mean, _var, ...)."""
    names, activations, taken = [], 0, set()
    for operand in operands:
        if isinstance(operand.mean, relax.Var) and operand.mean.name in weight_names:
            source = ir_state.onnx_name(initializers, operand.mean.name) if initializers else operand.mean.name
            base = "_".join(part for part in "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in source).split("_") if part)
            base = base[:40] if base and not base[0].isdigit() else f"w_{base}"[:40]
        else:
            base = "x" if activations == 0 else f"x{activations}"
            activations += 1
        name, index = base, 2
        while name.lower() in taken:
            name, index = f"{base}_{index}", index + 1
        taken.add(name.lower())
        names.append(name)
    return names


class KernelEmitter:
    """Emits Gaussian kernel calls into a BlockBuilder, naming kernels uniquely and readably."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb = bb
        self.used = {"main"}  # the Relax function beside the kernels in the module
        self.last_index = {}  # base -> the index of its last name: every smaller one is taken

    def unique(self, base: str) -> str:
        base = "".join(ch if ch.isalnum() else "_" for ch in base).strip("_") or "kernel"
        index = self.last_index.get(base, 1)
        name = base if index == 1 else f"{base}_{index}"
        while name in self.used:
            index += 1
            name = f"{base}_{index}"
        self.used.add(name)
        self.last_index[base] = index
        return name

    def emit(self, spec: KernelSpec, operands: list[GaussianValue], label: str, names=()) -> GaussianValue:
        shapes = [shape_of(op.mean) for op in operands]
        name = self.unique(label)
        spec = spec.with_(names=tuple(names) or tuple(f"in{i}" for i in range(len(operands))))
        prim, out_shape = placeholder_kernel(spec, shapes, name)  # built once, before code generation (`build_kernels`)
        gvar = self.bb.add_func(prim, name)
        out_repr = spec.output
        count = 1 if out_repr == Moment.NONE else 2
        out_ty = [relax.TensorType(out_shape, "float32")] * count
        args = [arg for op in operands for arg in op.args()]
        if count == 1:
            mean = self.bb.emit(relax.call_tir(gvar, relax.Tuple(args), out_ty[0]), f"{name}_mean")
            return GaussianValue(mean)
        result = self.bb.emit(relax.call_tir(gvar, relax.Tuple(args), out_ty), name)
        mean = self.bb.emit(relax.TupleGetItem(result, 0), f"{name}_mean")
        moment = self.bb.emit(relax.TupleGetItem(result, 1), f"{name}_{out_repr}")
        return GaussianValue(mean, moment, out_repr)


def build_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every placeholder kernel the passes emitted (`ops.kernel.placeholder_kernel`)
    built: what code generation, TVM's own builds and IR dumps read."""
    placeholders = [(gvar, func) for gvar, func in mod.functions_items() if is_placeholder(func)]
    if not placeholders:
        return mod
    mod = mod.clone()
    for gvar, func in placeholders:
        mod[gvar] = build_placeholder(func)
    return mod


class KernelBuilder(relax.BlockBuilder):
    """A BlockBuilder that adds kernels (PrimFuncs) to the module without deduplicating them.

    `relax.BlockBuilder.add_func` hashes every function structurally to find an equal one
    already added; pfpc's kernels are named uniquely (`KernelEmitter.unique`, their
    ``global_symbol``), so none is ever equal to another, and the hashing was a quarter of the
    compile time of long graphs (250-node chain: 792 calls, 8.7 s). The kernels are added to the
    module when it is taken (`get`)."""

    def add_func(self, func, func_name: str):
        if not isinstance(func, tvm.tirx.PrimFunc):
            return super().add_func(func, func_name)
        gvar = relax.GlobalVar(func_name)
        relax.expr._update_type(gvar, func.ty)  # what add_func gives the GlobalVar: call_tir checks its callee's type
        if not hasattr(self, "kernels_added"):
            self.kernels_added = []
        self.kernels_added.append((gvar, func))
        return gvar

    def _exit_function_scope(self, exc_type, exc_val, exc_tb):
        if exc_type is not None:
            # an exception (an interrupt) left the function's binding block and scope open: close
            # them, or the builder's destructor prints "BlockBuilder destroyed with remaining blocks!"
            # beside pfpc's one line
            self._end_block()
            self.end_scope()
        super()._exit_function_scope(exc_type, exc_val, exc_tb)

    def get(self) -> tvm.IRModule:
        mod = super().get()
        for gvar, func in getattr(self, "kernels_added", ()):
            mod[gvar] = func
        return mod


class _RecordingBuilder(KernelBuilder):
    """A BlockBuilder that lists the variables it binds (``emitted``)."""

    def emit(self, expr, name_hint=""):
        var = super().emit(expr, name_hint)
        self.emitted.append(var)
        return var


class MainRewriter:
    """Rebuilds ``main`` binding by binding; subclasses override `visit_binding`.

    The default copies a binding with its arguments remapped, so a pass only handles the
    bindings it rewrites. Kernels (PrimFuncs) still called are carried over under their names.
    Provenance (``pfp.onnx_nodes``) follows: every binding emitted while visiting one gets the
    ONNX nodes of the visited binding (``self.provenance``; `add_provenance` adds another's).
    """

    def __init__(self, mod: tvm.IRModule):
        self.mod = mod
        self.func = mod["main"]
        self.bb = _RecordingBuilder()
        self.bb.emitted = []
        self.kernels = KernelEmitter(self.bb)
        self.carried = {}  # kernel of the module read -> its GlobalVar in the module built
        self.env = {}
        self.new_params = []  # parameters a subclass adds during the walk, appended to ``params``
        self.source_nodes = ir_state.onnx_nodes(self.func)
        self.provenance: tuple = ()  # the ONNX nodes of the binding being visited

    def add_provenance(self, var):
        """The bindings emitted for the current one also compute ``var``'s ONNX nodes (a fused or swapped binding)."""
        self.provenance = tuple(sorted(set(self.provenance) | set(self.source_nodes.get(var.name, ()))))

    def remap(self, expr):
        if isinstance(expr, relax.Var):
            return self.env.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.remap(field) for field in expr.fields])
        return expr

    def copy_binding(self, binding):
        value = binding.value
        if isinstance(value, relax.Call):
            args = [self.remap(arg) for arg in value.args]
            if call_op_name(value) == "relax.call_tir":
                gvar = value.args[0]
                if gvar not in self.carried:  # one kernel called twice stays one kernel
                    self.carried[gvar] = self.bb.add_func(self.mod[gvar], self.kernels.unique(gvar.name_hint))
                args[0] = self.carried[gvar]
            value = relax.Call(value.op, args, value.attrs, value.ty_args)
        elif isinstance(value, relax.TupleGetItem):
            value = relax.TupleGetItem(self.remap(value.tuple_value), value.index)
        else:
            value = self.remap(value)
        self.env[binding.var] = self.bb.emit(value, binding.var.name)

    def visit_binding(self, binding):
        self.copy_binding(binding)

    def output(self, body):
        return self.remap(body)

    def run(self, params, attrs) -> tvm.IRModule:
        nodes = {}
        with self.bb.function("main", attrs=attrs):
            with self.bb.dataflow():
                for binding in main_bindings(self.func):
                    self.provenance = self.source_nodes.get(binding.var.name, ())
                    mark = len(self.bb.emitted)
                    self.visit_binding(binding)
                    for var in self.bb.emitted[mark:]:
                        if self.provenance:
                            nodes[var.name] = tuple(sorted(set(nodes.get(var.name, ())) | set(self.provenance)))
                out = self.bb.emit_output(self.output(self.func.body.body))
            self.bb.emit_func_output(out, params=list(params) + self.new_params)
        mod = self.bb.get()
        if ir_state.ONNX_NODES in attrs:
            mod["main"] = with_attrs(mod["main"], ir_state.encode(onnx_nodes=nodes))
        return mod


def func_attrs(func, changes=None, **updates) -> dict:
    """The attributes of ``func`` but its symbol, with ``changes`` ({attribute: value}, typically
    `ir_state.encode`'s) and ``updates`` (``pfp__x=`` for ``pfp.x``) applied; None removes one."""
    attrs = {str(k): func.attrs[k] for k in func.attrs.keys()} if func.attrs is not None else {}
    attrs.pop("global_symbol", None)
    for key, value in {**(changes or {}), **{k.replace("__", "."): v for k, v in updates.items()}}.items():
        if value is None:
            attrs.pop(key, None)
        else:
            attrs[key] = value
    return attrs


def with_attrs(func, attrs: dict):
    func = func.with_attr("global_symbol", "main")
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


def with_used_weights(mod: tvm.IRModule, means: dict, variances: dict, names: dict, positions: dict) -> tvm.IRModule:
    """``main`` without the weight parameters it no longer uses, its weight attributes
    (``pfp.params``, ``pfp.weight_var``, ``pfp.onnx_names``, ``pfp.weight_positions``) set from
    the given dicts."""
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    used = used_vars(func.body)
    params = list(func.params[:num_input]) + [p for p in func.params[num_input:] if p in used]
    kept = {p.name for p in params[num_input:]}
    attrs = func_attrs(func, ir_state.encode(
        means={k: v for k, v in means.items() if k in kept},
        variances={k: v for k, v in variances.items() if k in kept},
        onnx_names={k: v for k, v in names.items() if k in kept},
        weight_positions={k: v for k, v in positions.items() if k in kept},
    ))
    mod["main"] = with_attrs(relax.Function(params, func.body, func.ret_ty, func.is_pure), attrs)
    return mod


def used_vars(expr) -> set:
    used = set()

    def visit(node):
        if isinstance(node, relax.Var):
            used.add(node)

    relax.analysis.post_order_visit(expr, visit)
    return used
