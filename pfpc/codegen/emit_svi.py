"""Sampling (SVI) code generation: the baseline the probabilistic forward pass replaces.

The compiled module is the deterministic network (`pfpc.passes.pipeline.svi_passes`); its
stochastic weights carry their std in ``pfp.sampled_std``, in the layout the kernels read. The
generated ``<name>_run`` has the PFP signature and computes, for s = 1..S:

    w = mean + std * eps,  eps ~ N(0, 1)    for every stochastic weight (into the arena)
    y = network(x; w)                       the deterministic kernels, once
    Welford: mean_y += (y - mean_y) / s;  m2 += (y - old mean_y) * (y - new mean_y)

and returns mean_y and the unbiased sample variance m2 / (S - 1), the estimator
`tests/reference.py` and `pfpc.verify` use. An output computed by a final softmax returns, like the
PFP's, its value, the mean of the S sampled softmaxes (for a log-softmax the log of that mean), and
its logits' sample mean and variance. eps comes from xoshiro128+ (32-bit integer arithmetic:
the same uniforms on every target) through Box-Muller (both values of a pair are used). The
generator restarts from the seed on every call, so a call is a deterministic function of its input
and the library keeps no state between calls. No malloc: the drawn weights live in the arena, the
means and stds stay ``static const``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ir_state
from ..errors import PfpcError
from ..ops.gaussian import Moment
from .build_files import render_build_files
from .emit_c import (
    render_arena_pointers,
    render_header,
    render_source,
    render_steps,
    render_weights,
    run_signature,
    wrap_arguments,
)
from .naming import c_comment
from .program import Program, Tensor, plan_arena, walk_main


@dataclass
class SampledWeight:
    tensor: Tensor  # the arena buffer the kernels read, drawn again for every sample
    mean_name: str
    std_name: str
    mean: np.ndarray
    std: np.ndarray
    onnx_name: str
    # a tied use of an initializer drawn in another layout: copied from that draw, not drawn
    tied_to: "SampledWeight | None" = None
    gather: np.ndarray | None = None  # this[i] = tied_to[gather[i]]
    gather_name: str = ""


def tie_layouts(sampled: list, positions: dict) -> None:
    """Tied weights: when one initializer is read in several layouts (W by a MatMul, W^T by a
    Gemm with transB), each sample must use one draw of it. The first layout is drawn; the others
    are gathered from it through the weights' provenance (``pfp.weight_positions``: the flat
    position in the initializer of every element)."""
    drawn = {}
    for weight in sampled:
        name = weight.tensor.param
        where = ir_state.source_positions(positions, name, weight.mean.shape)
        first = drawn.get(weight.onnx_name)
        if first is None:
            drawn[weight.onnx_name] = weight, where
            continue
        first, first_where = first
        if where is None or first_where is None or np.unique(first_where).size != first_where.size:
            raise PfpcError(f"--mode svi: initializer '{weight.onnx_name}' is read by several nodes in forms a pass "
                            f"changed at compile time (a folded batch norm or scaling); sampling it once per sample "
                            f"for all of them is not supported")
        inverse = np.full(int(first_where.max()) + 1, -1, dtype=np.int64)
        inverse[first_where.reshape(-1)] = np.arange(first_where.size)
        gather = inverse[where.reshape(-1)]
        if np.any(gather < 0):
            raise PfpcError(f"--mode svi: initializer '{weight.onnx_name}' is read in two layouts that do not hold "
                            f"the same elements; tied sampling is not supported")
        weight.tied_to, weight.gather = first, gather.astype(np.uint16 if first_where.size <= 1 << 16 else np.uint32)


@dataclass
class Sampling:
    samples: int
    seed: int
    weights: list  # SampledWeight
    accumulate: list  # (output C name, Tensor holding one sample of it)
    # softmax outputs: (C name, Tensor holding one sample's probabilities, log of the average at the end)
    average: list = None

    @property
    def sampled_bytes(self) -> int:
        return sum(4 * w.tensor.elements for w in self.weights)

    def render(self, program) -> dict[str, str]:
        """The generated files (`emit_c.render` asks the program's sampling for them)."""
        return render_svi(program)

    def metadata(self) -> dict:
        """The keys ``pfpc.json`` gets in mode svi."""
        return {"mode": "svi", "samples": self.samples, "seed": self.seed, "sampled_weights_bytes": self.sampled_bytes,
                "draws_per_sample": sum(w.tensor.elements for w in self.weights if w.tied_to is None)}


def lower_to_program(mod, weights: dict, io: dict, name: str, samples: int, seed: int, target=None) -> Program:
    """The steps of the deterministic network, the weights to draw and the outputs to accumulate."""
    func = mod["main"]
    if ir_state.SAMPLED_STD not in func.attrs:
        raise PfpcError("--mode svi: the pass list has no DetachWeightStd after fold_weight_layout "
                        "(see pfpc.passes.pipeline.svi_passes)")
    stds = ir_state.sampled_std(func)
    functions = [f"{name}_{f}" for f in ("rng", "mix32", "rng_seed", "rng_next", "normal", "draw", "accumulate")]
    program, out_fields, weight_tensors = walk_main(mod, weights, io, name, reserved=["rng", "sample", "i", *functions], target=target)
    rewritten = sorted(set(stds) - set(weight_tensors))
    if rewritten:
        raise PfpcError(f"internal: a pass after detach_weight_std rewrote the stochastic weight(s) {', '.join(rewritten)}")
    after_last_step = len(program.steps)  # the accumulation reads the outputs there
    sampled = []
    for param_name, tensor in weight_tensors.items():
        if param_name not in stds:
            continue
        mean, onnx_name = program.weights.pop(tensor.c_name)
        mean_name = tensor.c_name  # <initializer>_mean (`naming.weight_name`); the arena holds the draw
        tensor.c_name = program.namer(f"{tensor.stem}_sample", prefix=f"{name}_")
        tensor.kind, tensor.produced, tensor.last_use = "arena", -1, after_last_step
        program.tensors.append(tensor)
        sampled.append(SampledWeight(tensor, mean_name, program.namer(f"{tensor.stem}_std", prefix=f"{name}_"),
                                     mean, stds[param_name], onnx_name))
    tie_layouts(sampled, ir_state.weight_positions(func))
    for weight in sampled:
        if weight.tied_to is not None:
            weight.gather_name = program.namer(f"{weight.tensor.stem}_tied_gather", prefix=f"{name}_")
    accumulate, average = [], []
    for index, ((onnx_name, shape), repr_, c_name) in enumerate(zip(io["outputs"], ir_state.output_moments(func), program.output_stems)):
        if repr_ != Moment.NONE:
            raise PfpcError(f"internal: output '{onnx_name}' of the sampled network is not deterministic")
        program.outputs.append((c_name, onnx_name, shape))
        tensor = out_fields.pop(0)
        if tensor.kind == "arena":
            tensor.last_use = after_last_step
        accumulate.append((f"{c_name}_logits" if program.softmax_of(index) is not None else c_name, tensor))
    for entry, tensor in zip(program.output_softmax, out_fields):  # each sample's probabilities (AppendPredictiveOutputs)
        if tensor.kind == "arena":
            tensor.last_use = after_last_step
        average.append((program.outputs[entry["output"]][0], tensor, entry["function"] == "log_softmax"))
    plan_arena(program)
    program.sampling = Sampling(samples, seed, sampled, accumulate, average)
    return program


def render_svi(program: Program) -> dict[str, str]:
    """The generated files of mode svi; the build files are those of the PFP."""
    name, upper, sampling = program.name, program.name.upper(), program.sampling
    files = {}
    definitions = f"""
/* Sampling (SVI) build: {name}_run draws every stochastic weight as mean + std * N(0, 1) and runs
 * the network {upper}_SAMPLES times; it returns the sample mean and the unbiased sample variance
 * (sum of squared deviations / ({upper}_SAMPLES - 1)). The generator (xoshiro128+, Box-Muller)
 * restarts from {upper}_SEED on every call: the same input gives the same output, every call uses
 * the same {upper}_SAMPLES weight draws, and no state is kept between calls (reentrant). Override
 * either with -D{upper}_SAMPLES=... or -D{upper}_SEED=... (an unsigned 32-bit value). */
#ifndef {upper}_SAMPLES
#define {upper}_SAMPLES {sampling.samples}
#endif
#if {upper}_SAMPLES < 2
#error "{upper}_SAMPLES must be at least 2 (the variance divides by {upper}_SAMPLES - 1)"
#endif
#ifndef {upper}_SEED
#define {upper}_SEED {sampling.seed}u
#endif
/* Bytes of the arena that hold the drawn weights: {len(sampling.weights)} stochastic tensors,
 * {sum(w.tensor.elements for w in sampling.weights if w.tied_to is None)} floats drawn per sample. */
#define {upper}_SAMPLED_WEIGHTS_BYTES {sampling.sampled_bytes}
"""
    files[f"{name}.h"] = render_header(
        program, f"Sampling (SVI): one call runs the network on\n * {upper}_SAMPLES draws of the weights and returns "
                 "the sample mean and variance of every output.\n *", definitions,
        f"\n * It includes the drawn weights ({upper}_SAMPLED_WEIGHTS_BYTES bytes).")
    extra = []
    for weight in sampling.weights:
        if weight.tied_to is not None:
            extra.append((weight.gather_name, weight.gather, f"where each element of the tied use of initializer "
                          f"'{c_comment(weight.onnx_name)}' is in the draw of {weight.tied_to.tensor.c_name}"))
            continue
        extra.append((weight.mean_name, weight.mean, f"posterior mean of initializer '{c_comment(weight.onnx_name)}', drawn per sample"))
        extra.append((weight.std_name, weight.std, f"posterior std of initializer '{c_comment(weight.onnx_name)}'"))
    files[f"{name}_weights.h"] = render_weights(program, extra)
    files[f"{name}.c"] = render_source(
        program, "the executor below\n * draws the stochastic weights and runs them once per sample, accumulating "
                 "the outputs' mean and variance.", (_generator(name) if sampling.weights else "") + _executor(program))
    files.update(render_build_files(program))
    return files


def _executor(program: Program) -> str:
    name, upper, sampling = program.name, program.name.upper(), program.sampling
    lines = render_arena_pointers(program)
    if sampling.weights:
        lines += [f"  {name}_rng rng;", "  long sample;", "  int32_t i;", f"  {name}_rng_seed(&rng, (uint32_t){upper}_SEED);"]
    else:
        lines += ["  long sample;", "  int32_t i;"]
    for c_name, tensor in sampling.accumulate:
        lines.append(f"  memset({c_name}_mean, 0, {4 * tensor.elements});")
        lines.append(f"  memset({c_name}_var, 0, {4 * tensor.elements});")
    for c_name, tensor, _ in sampling.average or ():
        lines.append(f"  memset({c_name}, 0, {4 * tensor.elements});")
    lines.append(f"  for (sample = 0; sample < {upper}_SAMPLES; sample++) {{")
    if sampling.weights:
        lines.append("    /* w = mean + std * N(0, 1) for every stochastic weight */")
    for weight in sampling.weights:
        if weight.tied_to is None:
            lines.append(f"    {name}_draw({weight.tensor.c_name}, {weight.mean_name}, {weight.std_name}, {weight.tensor.elements}, &rng);")
    for weight in sampling.weights:
        if weight.tied_to is not None:  # tied weights: the same draw in another layout
            lines.append(f"    for (i = 0; i < {weight.tensor.elements}; i++) {weight.tensor.c_name}[i] = "
                         f"{weight.tied_to.tensor.c_name}[{weight.gather_name}[i]];")
    lines += render_steps(program, "    ")
    for c_name, tensor in sampling.accumulate:
        lines.append(f"    {name}_accumulate({c_name}_mean, {c_name}_var, {tensor.c_name}, {tensor.elements}, 1.0f / (float)(sample + 1));")
    for c_name, tensor, _ in sampling.average or ():
        lines.append(f"    /* {c_name}: the running mean of the sampled softmaxes */")
        lines.append(f"    for (i = 0; i < {tensor.elements}; i++) {c_name}[i] += ({tensor.c_name}[i] - {c_name}[i]) / (float)(sample + 1);")
    lines.append("  }")
    for c_name, tensor, log in sampling.average or ():
        if log:
            lines.append(f"  for (i = 0; i < {tensor.size}; i++) {c_name}[i] = logf({c_name}[i]); /* log-softmax output: log of the mean probability */")
    lines.append("  /* unbiased sample variance */")
    for c_name, tensor in sampling.accumulate:
        lines.append(f"  for (i = 0; i < {tensor.elements}; i++) {c_name}_var[i] /= (float)({upper}_SAMPLES - 1);")
    lines.append("  return 0;")
    return f"""/* Welford's update with sample number count (inv_count = 1 / count): mean += (y - mean) / count,
 * and m2, the sum of squared deviations kept in the variance output, += (y - old mean) * (y - new mean). */
static void {name}_accumulate(float* mean, float* m2, const float* y, int32_t n, float inv_count) {{
  int32_t i;
  for (i = 0; i < n; i++) {{
    const float delta = y[i] - mean[i];
    mean[i] += delta * inv_count;
    m2[i] += delta * (y[i] - mean[i]);
  }}
}}

{wrap_arguments(run_signature(program) + " {", "    ")}
{chr(10).join(lines)}
}}
"""


def _generator(name: str) -> str:
    """The Gaussian generator and the weight draw, as static C functions."""
    return f"""/* Gaussian draws: xoshiro128+ 1.0 (Blackman and Vigna) gives uniform 32-bit integers (their
 * top 24 bits make uniform floats); Box-Muller turns two uniforms into two independent N(0, 1)
 * values, both of which are used. */
typedef struct {{
  uint32_t s[4];
  float spare; /* the second value of the last Box-Muller pair */
  int has_spare;
}} {name}_rng;

/* MurmurHash3's finalizer: a bijection, so the four distinct inputs below give four distinct words
 * and never the all-zero state that xoshiro cannot leave */
static uint32_t {name}_mix32(uint32_t h) {{
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}}

static void {name}_rng_seed({name}_rng* rng, uint32_t seed) {{
  int i;
  for (i = 0; i < 4; i++) rng->s[i] = {name}_mix32(seed + 0x9e3779b9u * (uint32_t)(i + 1));
  rng->spare = 0.0f;
  rng->has_spare = 0;
}}

static uint32_t {name}_rng_next({name}_rng* rng) {{
  uint32_t* s = rng->s;
  const uint32_t result = s[0] + s[3];
  const uint32_t t = s[1] << 9;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = (s[3] << 11) | (s[3] >> 21);
  return result;
}}

static float {name}_normal({name}_rng* rng) {{
  float radius, angle;
  if (rng->has_spare) {{
    rng->has_spare = 0;
    return rng->spare;
  }}
  /* u1 in (0, 1] keeps log(u1) finite; u2 in [0, 1) */
  radius = sqrtf(-2.0f * logf((float)(({name}_rng_next(rng) >> 8) + 1u) * 0x1p-24f));
  angle = 6.28318531f * ((float)({name}_rng_next(rng) >> 8) * 0x1p-24f);
  rng->spare = radius * sinf(angle);
  rng->has_spare = 1;
  return radius * cosf(angle);
}}

static void {name}_draw(float* w, const float* mean, const float* std, int32_t n, {name}_rng* rng) {{
  int32_t i;
  for (i = 0; i < n; i++) w[i] = mean[i] + std[i] * {name}_normal(rng);
}}

"""
