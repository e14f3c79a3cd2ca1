"""The public compile API: ONNX + posterior -> Relax -> passes -> standalone C.

This module orchestrates; the other jobs live beside it: option checks in `pfpc.options`, writing
outputs whole or not at all in `pfpc.atomic`, building and running the C (host, QEMU) in
`pfpc.runner`. The names below re-exported from those keep ``pfpc.compiler.run_host`` and friends
working.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import onnx
import tvm_ffi
from tvm import relax

from . import atomic, ir_state
from .codegen import emit_c, emit_svi, footprint, shared_weights
from .codegen.program import Program, lower_to_program
from .codegen.targets import get_target
from .errors import PfpcError
from .frontends import shared_posterior
from .frontends.onnx_model import final_softmax, input_shapes, load_model, output_shapes
from .frontends.posterior import Posterior, bind_posterior, load_posterior
from .frontends.relax_import import import_model
from .frontends.unroll_recurrent import unroll_recurrent
from .ir import build_kernels
from .options import MODES, SVI_DEFAULT_SAMPLES, check_c_name, check_outputs, check_sampling_options  # noqa: F401
from .passes.append_predictive_outputs import AppendPredictiveOutputs
from .passes.substitute_layers import SubstituteLayers
from .passes.apply_shared_draws import ApplySharedDraws
from .passes.carry_channel_covariance import CarryChannelCovariance
from .passes.fold_weight_moments import FoldWeightMoments
from .passes.share_dense_scale import ShareDenseScale
from .passes.pipeline import check_order, default_passes, for_target, svi_passes
from .progress import step
from .runner import RunResult, build_for_target, build_host, read_metadata, run, run_host  # noqa: F401

# A PfpcError raised inside a pass crosses TVM's FFI; registered, it comes back as itself.
tvm_ffi.register_error(PfpcError)


@dataclass
class CompiledModel:
    """What `compile` produced: the final IR (`mod`), the C program, the directory it was written
    to (None until `save`), the inputs' and outputs' shapes and, if measured, the footprint."""

    _mod: object
    program: Program
    out_dir: str | None
    io: dict
    footprint: dict | None = None

    @property
    def mod(self):
        """The final IR, every kernel built (code generation builds only the kernels it compiles:
        `ir.build_kernels` here on first read)."""
        self._mod = build_kernels(self._mod)
        return self._mod

    def save(self, out_dir: str, force: bool = False) -> str:
        """Write the C library and its build files to ``out_dir`` (whole or not at all; ``force``
        replaces a directory pfpc wrote before); returns ``out_dir``."""
        from . import __version__

        atomic.write_directory(out_dir, lambda staging: emit_c.write(self.program, staging), force=force, version=__version__)
        self.out_dir = out_dir
        return out_dir

    def run(self, inputs: list, emulate: bool = False) -> RunResult:
        """Build and run the C on ``inputs`` (see `pfpc.runner.run`); an unsaved model is written
        to a temporary directory first."""
        if self.out_dir is not None:
            return run(self.out_dir, inputs, emulate)
        with tempfile.TemporaryDirectory() as scratch:
            directory = os.path.join(scratch, self.program.name)
            emit_c.write(self.program, _made(directory))
            return run(directory, inputs, emulate)


def _made(directory):
    os.makedirs(directory)
    return directory


def compile(  # noqa: A001 - the public name users expect
    model,
    posterior,
    *,
    target: str = "host",
    out_dir: str | None = None,
    batch: int | None = None,
    passes=None,
    dump_ir: str | None = None,
    name: str = "pfp_model",
    force: bool = False,
    measure: bool = False,
    ram_limit: int | None = None,
    flash_limit: int | None = None,
    mode: str = "pfp",
    samples: int | None = None,
    seed: int | None = None,
    outputs=(),
    probs_method: str = "meanfield",
    logit_samples: int = 64,
    moment_storage: str = "float32",
    covariance: str = "auto",
    covariance_budget: float = 0.5,
    shared_scale: str = "auto",
) -> CompiledModel:
    """Compile ``model`` (path or ModelProto) with ``posterior`` (path, dict of arrays, or None
    for the deterministic network: every variance zero, said explicitly).

    ``mode="pfp"``: one probabilistic forward pass. ``mode="svi"``: the same ``<name>_run`` computes
    the predictive mean and variance by sampling: ``samples`` (default 100) draws of every weight
    the posterior names, from a generator seeded with ``seed`` (default 0) on every call (see
    `pfpc.codegen.emit_svi`).
    ``passes``: a list of (name, pass) to run instead of `for_target(default_passes(), target)` (`svi_passes()` in mode svi).
    ``dump_ir``: directory that receives the IR before and after every pass.
    ``out_dir``: where the C library is written (`CompiledModel.save`, whole or not at all).
    ``measure``: build the library with the target's compiler and return its footprint (flash,
    RAM, per-layer arithmetic); implied by ``ram_limit``/``flash_limit`` (bytes), which make the
    compile fail, leaving nothing behind, when the model does not fit. In mode pfp with the default
    passes, ``ram_limit`` first lowers the plan from the one asked for, most accurate first
    (`pfpc.ram_plans`: a smaller ``covariance_budget``, ``moment_storage="bfloat16"``), to the
    first whose arena + stack fit; ``footprint["ram_plan"]`` says which and why. A measurement that cannot
    be made (toolchain missing or broken) is reported in ``footprint["note"]``, never an error.
    ``outputs``: predictive outputs to add after the logits' mean and variance, a subset of
    ``("probs", "entropy", "mutual_information", "logit_var", "ood")``; ``probs_method``
    (meanfield, sampling or probit) and ``logit_samples`` (draws of the logits for sampling and
    mutual_information) say how (`pfpc.passes.append_predictive_outputs`, `pfpc.ops.predictive`).
    ``moment_storage="bfloat16"``: the variances between layers stored in 16 bits in the arena
    (`pfpc.codegen.program.store_moments_in_bfloat16`; mode pfp).
    ``covariance`` (auto, none, channel, pooled) and ``covariance_budget`` (a fraction of the
    diagonal PFP's work): the per-channel shared-noise propagation of convolutional networks
    (`pfpc.passes.carry_channel_covariance`, docs/covariance.md); ``auto`` uses it only where a
    loading can reach a mean over positions, within the budget.
    ``shared_scale`` (auto, on, off): one random scale shared by the units of a noise-dominated
    dense layer after a convolution chain, the layers after it run in two scenarios
    (`pfpc.passes.share_dense_scale`); ``auto`` uses it where the dense weights are mostly noise,
    within ``covariance_budget``.
    """
    if moment_storage not in ("float32", "bfloat16"):
        raise PfpcError(f"moment storage '{moment_storage}': float32 or bfloat16")
    if moment_storage != "float32" and mode != "pfp":
        raise PfpcError(f"moment storage {moment_storage} is for mode pfp (mode {mode} propagates no variances)")
    target_info = get_target(target)
    check_c_name(name)
    samples, seed = check_sampling_options(mode, samples, seed)
    outputs = check_outputs(outputs, mode)
    covariance_chosen = (covariance, covariance_budget, shared_scale) != ("auto", 0.5, "auto")
    if covariance_chosen and passes is not None:
        raise PfpcError("covariance options choose the default pipeline's carry_channel_covariance and share_dense_scale passes; "
                        "with passes= put CarryChannelCovariance(mode, budget) or ShareDenseScale(mode, budget) in the list instead")
    if covariance_chosen and mode != "pfp":
        raise PfpcError(f"covariance options are for mode pfp (mode {mode} runs the deterministic network on sampled weights)")
    custom_passes = passes is not None

    def pipeline(covariance, covariance_budget):
        return list(passes if custom_passes else for_target(svi_passes() if mode == "svi" else default_passes(covariance, covariance_budget, shared_scale), target_info))

    substituted = any(isinstance(transform, SubstituteLayers) for _, transform in pipeline(covariance, covariance_budget))
    predictive = AppendPredictiveOutputs(outputs, probs_method, logit_samples)  # options checked before the model is read
    if out_dir is not None:
        atomic.check_replaceable(os.path.abspath(out_dir), force)
    label = os.path.basename(model) if isinstance(model, (str, os.PathLike)) else "model"
    with step("reading the model and posterior"):
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, batch)
        elif isinstance(model, onnx.ModelProto):
            model = _load_proto(model, batch)
        shared_draw = mode == "pfp"  # the sampling build draws every weight on its own
        if posterior is None:
            post = bind_posterior(model, {})
        elif isinstance(posterior, Posterior):
            post = posterior
        elif isinstance(posterior, dict):
            post = bind_posterior(model, posterior, shared_draw=shared_draw)
        else:
            post = load_posterior(model, posterior, shared_draw=shared_draw)
        model, post = unroll_recurrent(model, post, label)

    def model_passes(covariance, covariance_budget):
        passes = pipeline(covariance, covariance_budget)
        if mode == "pfp" and post.shared is not None and post.shared.semantics == "shared_draw":
            # the per-channel loadings assume independent weight draws: shared draws keep the diagonal PFP
            off = {"carry_channel_covariance": CarryChannelCovariance("none"), "share_dense_scale": ShareDenseScale("off")}
            passes = [(label, off.get(label, transform)) for label, transform in passes]
            passes.append(("apply_shared_draws", ApplySharedDraws(shared_posterior.draws(post.shared))))
        if mode == "pfp" and post.shared is not None:  # codebooks: see FoldWeightMoments' weight_second
            passes = [(label, FoldWeightMoments(weight_second=False) if isinstance(transform, FoldWeightMoments) else transform)
                      for label, transform in passes]
        # the predictive outputs, and the value of every output that ends in a softmax
        if substituted and (outputs or any(final_softmax(model.graph, value.name) for value in model.graph.output)):
            passes.append(("append_predictive_outputs", predictive))
        return passes

    with step("importing the model into TVM Relax"):
        imported = _import_quietly(model, post, label)
    io = {"inputs": list(input_shapes(model).items()), "outputs": _output_shapes(model, imported)}
    if dump_ir:
        os.makedirs(dump_ir, exist_ok=True)
        _dump(dump_ir, 0, "import", imported)

    def build(covariance, covariance_budget):
        # passes may set functions of the module they are given: a plan after the first imports afresh
        mod = imported if not built else _import_quietly(model, post, label)
        built.append(covariance)
        return _run_passes(mod, model_passes(covariance, covariance_budget), dump_ir)

    built = []

    def generate(mod, moment_storage):
        weights = ir_state.means(mod["main"])
        with step("generating C (kernels, memory plan)"):
            if mode == "svi":
                return emit_svi.lower_to_program(mod, weights, io, name, samples, seed, target_info)

            def read_through_codebooks(program, prim_funcs):
                program.shared = shared_weights.encode(program, set(post.shared.tensors), prim_funcs)

            return lower_to_program(mod, weights, io, name, target_info,
                                    before_codegen=read_through_codebooks if post.shared is not None else None,
                                    moment_storage=moment_storage)

    plan = (covariance, covariance_budget, moment_storage)
    if ram_limit is not None and mode == "pfp" and not custom_passes:
        mod, program, ram_plan = _fit_ram(plan, build, generate, ram_limit, flash_limit, label)
    else:
        mod = build(covariance, covariance_budget)
        program, ram_plan = generate(mod, moment_storage), None
    result = CompiledModel(mod, program, None, io)
    if measure or ram_limit is not None or flash_limit is not None:
        def measure_and_check(directory):
            with step(f"measuring the footprint with {target_info.cc}"):
                result.footprint = footprint.measure(directory, read_metadata(directory), where=out_dir)
            footprint.check_limits(result.footprint, ram_limit, flash_limit, label)
            if ram_plan:
                result.footprint["ram_plan"] = ram_plan

        if out_dir is None:
            with tempfile.TemporaryDirectory() as scratch:
                emit_c.write(program, scratch)
                measure_and_check(scratch)
        else:
            from . import __version__

            with step("writing the C"):
                atomic.write_directory(out_dir, lambda staging: emit_c.write(program, staging), force=force,
                                       check=measure_and_check, version=__version__)
            result.out_dir = out_dir
    elif out_dir is not None:
        with step("writing the C"):
            result.save(out_dir, force)
    return result


def _fit_ram(asked, build, generate, ram_limit, flash_limit, label):
    """(mod, program, one line saying why) of the first plan of `ram_plans.candidates` (most accurate
    first) whose arena + stack fit ``ram_limit``; the RAM is measured as the footprint report
    measures it (the memory plan's arena, the target compiler's -fstack-usage). A plan whose arena
    alone exceeds the limit is not built. Nothing fits: one error naming the smallest plan's RAM."""
    import json

    from . import ram_plans

    modules, seen, needs = {}, set(), []
    plans = ram_plans.candidates(*asked)
    for index, plan in enumerate(plans):
        covariance, budget, storage = plan
        diagonal = next((built for built in modules.values() if ir_state.covariance(built["main"]) is None), None)
        if (covariance, budget) not in modules:
            # auto placed no loadings (no pool to reach, or a batch): every smaller budget, and none, is that program
            modules[covariance, budget] = diagonal if diagonal is not None else build(covariance, budget)
        mod = modules[covariance, budget]
        loadings = (ir_state.covariance(mod["main"]) or {}).get("convolutions")
        key = (json.dumps(loadings), storage)
        last = index == len(plans) - 1
        if key in seen and not last:
            continue  # a smaller budget that places the same loadings: the same program
        seen.add(key)
        program = generate(mod, storage)
        if program.arena_size > ram_limit and not last:
            needs.append((plan, f"an arena of {program.arena_size:,} bytes"))
            continue
        with tempfile.TemporaryDirectory() as scratch:
            emit_c.write(program, scratch)
            with step("measuring the footprint"):
                measured = footprint.measure(scratch, read_metadata(scratch))
        ram = measured["ram_bytes"]
        if ram > ram_limit and last:
            where = "" if plan == asked else f" even with {ram_plans.describe(plan)}, its smallest plan"
            raise PfpcError(f"{label}: the model needs {ram:,} bytes of RAM ({footprint.ram_parts(measured)}){where}, "
                            f"more than the limit of {ram_limit:,} bytes")
        if ram > ram_limit:
            needs.append((plan, f"{ram:,} bytes"))
            continue
        footprint.check_limits(measured, None, flash_limit, label)  # the plans differ in RAM; flash is checked as asked
        if plan == asked:
            why = "the plan asked for fits"
        else:
            better, need = needs[-1]
            why = f"the most accurate plan that fits: {ram_plans.describe(better)} needs {need}"
        placed = " (no loadings placed: the diagonal PFP)" if covariance == "auto" and loadings is None else ""
        line = f"RAM limit {ram_limit:,} bytes: {ram_plans.describe(plan)}{placed}, {footprint.ram_parts(measured)} = {ram:,} bytes; {why}"
        return mod, program, line
    raise AssertionError("unreachable: the last plan returns or raises")


def _import_quietly(model, post, label):
    """`import_model` with TVM's importer kept off stdout (it prints the failing operator there);
    on a failure the operator it named goes into the step an internal-error message names."""
    import contextlib
    import io
    import re

    from . import progress

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return import_model(model, post, label)
    except Exception:
        failed = re.search(r"Error converting operator (\S+?),", printed.getvalue())
        if failed:
            progress.current[0] += f" (ONNX operator {failed.group(1)})"
        raise


def _run_passes(mod, passes, dump_ir=None):
    check_order(passes)
    for index, (pass_name, transform) in enumerate(passes, start=1):
        with step(f"pass {pass_name}"):
            mod = transform(mod)
        if dump_ir:
            _dump(dump_ir, index, pass_name, mod)
    return mod




def _output_shapes(model, mod):
    """(name, shape) per model output, shapes as TVM's importer computed them: ONNX shape
    inference disagrees with onnxruntime for a ceil-mode pooling window that would start in
    the end padding (onnxruntime and the importer drop it)."""
    ret = mod["main"].ret_ty
    types = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = list(output_shapes(model))
    return [(name, [int(d) for d in ty.shape]) for name, ty in zip(names, types)]


def _load_proto(model, batch):
    with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as handle:
        handle.write(model.SerializeToString())
    try:
        return load_model(handle.name, batch)
    finally:
        os.unlink(handle.name)


def _dump(directory, index, name, mod):
    with open(os.path.join(directory, f"{index:02d}_{name}.py"), "w") as handle:
        handle.write(build_kernels(mod).script(show_meta=False))
