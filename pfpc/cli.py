"""Command line: ``pfpc MODEL --posterior POST -o OUT``, ``pfpc run``, ``pfpc report``, ``pfpc verify``,
``pfpc evaluate``, ``pfpc bench``."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .errors import PfpcError

COMMANDS = ("run", "verify", "report", "bench", "evaluate", "compress", "import-posterior")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2 like every other error (argparse prints the usage block too)."""

    def error(self, message):
        print(f"pfpc: error: {PfpcError(f'{message} (see {self.prog} --help)')}", file=sys.stderr)
        sys.exit(PfpcError.exit_code)


def _compile_parser():
    parser = _Parser(prog="pfpc", description="Compile a Bayesian neural network to standalone C (one-pass PFP).")
    parser.add_argument("model", help="ONNX model of the posterior-mean network")
    parser.add_argument("--posterior", help="posterior .npz (<initializer>.std|.var|.logvar|.rho[, .mean])")
    parser.add_argument("--target", default="host", help="host (default), arm, ...")
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--batch", type=int, help="fixed batch size for a symbolic batch dimension")
    parser.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass into DIR")
    parser.add_argument("--name", default="pfp_model", help="C prefix of the generated library (default pfp_model)")
    parser.add_argument("--outputs", metavar="LIST", default="",
                        help="predictive outputs after the logits' mean and variance, comma-separated: probs (probit "
                        "probabilities), entropy (predictive entropy), ood (mean logit variance)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--mode", choices=("pfp", "svi"), default="pfp",
                        help="pfp (default): one probabilistic forward pass; svi: the same API computed by sampling the weights")
    parser.add_argument("--samples", type=int, help="with --mode svi: weight samples per call (default 100; -D<NAME>_SAMPLES overrides)")
    parser.add_argument("--seed", type=int, help="with --mode svi: seed of the on-device generator (default 0)")
    parser.add_argument("--ram-limit", metavar="BYTES", help="fail if arena + stack exceed this (e.g. 192K)")
    parser.add_argument("--flash-limit", metavar="BYTES", help="fail if weights + code exceed this (e.g. 1M)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _bench_parser():
    parser = _Parser(prog="pfpc bench", description="Time the PFP against the deterministic network, "
                                     "SVI generated as C, SVI in onnxruntime and TVM's LLVM build, side by side.")
    parser.add_argument("model")
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--batches", default="1,8,32,128", help="comma-separated batch sizes (default 1,8,32,128)")
    parser.add_argument("--samples", default="10,30,100", help="SVI sample counts (default 10,30,100)")
    parser.add_argument("--input", help=".npy inputs, repeated to fill a batch; default: standard normal")
    parser.add_argument("--cycles-target", default="cortex-m4", help="Cortex-M target for cycle counts under QEMU ('' for none)")
    parser.add_argument("--no-tvm", action="store_true", help="skip TVM's LLVM build in the Relax VM")
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    parser.add_argument("--debug", action="store_true")
    return parser


def _int_list(text, option):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PfpcError(f"{option}: '{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise PfpcError(f"{option}: '{text}' must list positive integers")
    return values


def _bench(args) -> int:
    from .bench import benchmark_model, markdown

    batches, samples = _int_list(args.batches, "--batches"), _int_list(args.samples, "--samples")
    if min(samples) < 2:
        raise PfpcError("--samples: SVI needs at least 2 samples")
    inputs = _load_npy(args.input) if args.input else None
    result = benchmark_model(args.model, args.posterior, batches, samples, inputs, tvm_vm=not args.no_tvm,
                             cycles_target=args.cycles_target or None, progress=lambda text: print(f"pfpc bench: {text}", file=sys.stderr))
    text = markdown({os.path.basename(args.model): result}, samples)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    return 0


def _report_parser():
    parser = _Parser(prog="pfpc report", description="Flash, RAM and arithmetic of a compiled model, "
                                     "measured with its target's compiler and size tool.")
    parser.add_argument("out_dir")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--debug", action="store_true")
    return parser


def _run_parser():
    parser = _Parser(prog="pfpc run", description="Build the generated C and run it, on the host or "
                                     "(--emulate) for its target under QEMU.")
    parser.add_argument("out_dir")
    parser.add_argument("--input", required=True, action="append", help=".npy input (repeat for several inputs)")
    parser.add_argument("--output", required=True, help=".npz to write: mean and var (mean_<i>, var_<i> for several outputs), "
                        "and probs/entropy/ood if compiled with --outputs")
    parser.add_argument("--emulate", action="store_true", help="build for the compiled target and run under QEMU")
    parser.add_argument("--cycles", action="store_true", help="with --emulate on Cortex-M: print cycles (instructions executed under QEMU) and peak stack per call")
    parser.add_argument("--debug", action="store_true")
    return parser


def _verify_parser():
    parser = _Parser(prog="pfpc verify", description="Compare the compiled PFP with Monte Carlo sampling.")
    parser.add_argument("model")
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--input", action="append", help=".npy input (repeat for several inputs, in the model's order); "
                        "default: the first batch of standard-normal inputs")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-layer", action="store_true", help="compare every layer output (each truncated graph compiled) with Monte Carlo")
    parser.add_argument("--digits", type=int, metavar="N", help="inputs: the first N images of every dirty-digits set (instead of --input)")
    parser.add_argument("--debug", action="store_true")
    return parser


def _evaluate_parser():
    parser = _Parser(
        prog="pfpc evaluate",
        description="Uncertainty quality of the deterministic mean network, SVI (Monte Carlo) and the compiled PFP "
        "on the dirty-digits suite: accuracy, NLL, ECE, Brier, entropies, mutual information, OOD AUROC.",
    )
    parser.add_argument("model", help="ONNX classifier taking 8x8 digits ([N, 64] or [N, 1, 8, 8])")
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--samples", type=int, default=100, help="SVI weight samples (default 100)")
    parser.add_argument("--report", metavar="DIR", help="write <model>.md and plots (needs matplotlib) into DIR")
    parser.add_argument("--mnist-images", metavar="IDX", help="MNIST IDX images (optionally .gz) instead of scikit-learn's digits")
    parser.add_argument("--mnist-labels", metavar="IDX", help="the matching IDX labels")
    parser.add_argument("--limit", type=int, help="use only the first N clean images (the other sets follow)")
    parser.add_argument("--ood-classes", help="comma-separated classes moved from the clean set to a held-out-classes OOD set "
                        "(only meaningful for a model trained without them)")
    parser.add_argument("--per-layer", action="store_true", help="also report PFP vs Monte Carlo per layer on a subset of the data")
    parser.add_argument("--svi-repeats", type=int, default=0, metavar="R",
                        help="rerun SVI with R other seeds and report how much its metrics move")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true")
    return parser


def _import_parser():
    from .frontends.importers import FORMATS

    parser = _Parser(prog="pfpc import-posterior", description="Turn the posterior of a BNN trained with "
                                     "another library into a pfpc posterior .npz for the ONNX mean network.")
    parser.add_argument("checkpoint", help="the library's checkpoint (torch.save'd state dict, Pyro param store, Keras .h5 weights or TF checkpoint)")
    parser.add_argument("--from", dest="format", required=True, choices=sorted(FORMATS), help="the library that trained it")
    parser.add_argument("--onnx", required=True, help="ONNX model of the posterior-mean network")
    parser.add_argument("-o", "--output", required=True, help="posterior .npz to write (<initializer>.std)")
    parser.add_argument("--allow-unmatched", action="store_true",
                        help="leave checkpoint tensors that match no initializer out (deterministic) instead of failing")
    parser.add_argument("--debug", action="store_true")
    return parser


def _import_posterior(args) -> int:
    from .frontends.importers import match_posterior, write_npz

    result = match_posterior(args.format, args.checkpoint, args.onnx, args.allow_unmatched)
    write_npz(result.arrays, args.output)
    print(result.report())
    print(f"pfpc: wrote {args.output}: {len(result.arrays)} stochastic tensors")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "compile"
    parsers = {"compile": _compile_parser, "run": _run_parser, "verify": _verify_parser, "report": _report_parser,
               "bench": _bench_parser, "evaluate": _evaluate_parser, "compress": _compress_parser,
               "import-posterior": _import_parser}
    args = parsers[command]().parse_args(
        argv[1:] if command != "compile" else argv
    )
    args.argv = argv
    try:
        return {"compile": _compile, "run": _run, "verify": _verify, "report": _report, "bench": _bench,
                "evaluate": _evaluate, "compress": _compress, "import-posterior": _import_posterior}[command](args)
    except PfpcError as err:
        if args.debug:
            raise
        print(f"pfpc: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _compile(args) -> int:
    from .codegen.footprint import format_report, parse_bytes
    from .compiler import compile as compile_model

    ram_limit = parse_bytes(args.ram_limit, "--ram-limit") if args.ram_limit else None
    flash_limit = parse_bytes(args.flash_limit, "--flash-limit") if args.flash_limit else None
    result = compile_model(
        args.model, args.posterior, target=args.target, out_dir=args.output, batch=args.batch,
        dump_ir=args.dump_ir, name=args.name, force=args.force, measure=True, ram_limit=ram_limit, flash_limit=flash_limit,
        mode=args.mode, samples=args.samples, seed=args.seed, outputs=[o for o in args.outputs.split(",") if o],
    )
    sampling = result.program.sampling
    detail = f" run once per sample, {sampling.samples} samples (SVI)" if sampling else ""
    print(f"pfpc: wrote {args.output}: {len(result.program.steps)} kernels{detail}")
    print(format_report(result.footprint, args.name))
    return 0


def _check_out_dir(out_dir):
    if not os.path.exists(os.path.join(out_dir, "pfpc.json")):
        raise PfpcError(f"{out_dir}: not a directory written by pfpc (no pfpc.json)")


def _report(args) -> int:
    import json

    from .codegen.footprint import format_report, measure
    from .compiler import read_metadata

    _check_out_dir(args.out_dir)
    meta = read_metadata(args.out_dir)
    result = measure(args.out_dir, meta)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_report(result, meta["name"]))
    return 0


def _load_npy(path):
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PfpcError(f"{path}: no such input file") from None
    except Exception as err:
        raise PfpcError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        found = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else "an .npz archive"
        raise PfpcError(f"{path}: {found}, expected an .npy array of real numbers")
    return array


def _run(args) -> int:
    from .codegen.targets import get_target
    from .compiler import read_metadata, run

    _check_out_dir(args.out_dir)
    if args.cycles and not args.emulate:
        raise PfpcError("--cycles needs --emulate (cycles are counted on the emulated Cortex-M)")
    if args.cycles:
        compiled_for = read_metadata(args.out_dir).get("target", "host")
        if not get_target(compiled_for).bare_metal:
            raise PfpcError(f"{args.out_dir}: --cycles needs a Cortex-M target (compiled for {compiled_for})")
    inputs = [_load_npy(p) for p in args.input]
    outcome = run(args.out_dir, inputs, emulate=args.emulate)
    results, extras = outcome.outputs, outcome.extras
    arrays = {}
    for index, (mean, var) in enumerate(results):
        suffix = "" if len(results) == 1 else f"_{index}"
        arrays[f"mean{suffix}"], arrays[f"var{suffix}"] = mean, var
    arrays.update(extras)
    try:
        np.savez(args.output, **arrays)
    except OSError as err:
        raise PfpcError(f"{args.output}: cannot write the predictions: {err.strerror}") from None
    for index, (mean, var) in enumerate(results):
        print(f"output {index}: mean {np.array2string(mean, precision=4, threshold=40)}")
        print(f"output {index}: var  {np.array2string(var, precision=4, threshold=40)}")
    for kind, value in extras.items():
        print(f"{kind}: {np.array2string(value, precision=4, threshold=40)}")
    if args.cycles:
        print(f"cycles per call (QEMU -icount shift=0: one per instruction executed): {' '.join(map(str, outcome.cycles))}; "
              f"median {int(np.median(outcome.cycles))}")
        print(f"peak stack per call (painted, libm included): {max(outcome.stack_bytes)} bytes")
    return 0


def _verify(args) -> int:
    import tempfile

    from .compiler import compile as compile_model
    from .compiler import run_host
    from .frontends.onnx_model import input_shapes, load_model
    from .frontends.posterior import load_posterior
    from .verify import compare, monte_carlo, per_layer

    if args.input and args.digits:
        raise PfpcError("give --input or --digits, not both")
    given = [_load_npy(path).astype(np.float32) for path in args.input] if args.input else None
    if args.digits:
        from .evaluate.datasets import default_suite

        given = [np.concatenate([s.x[: args.digits] for s in default_suite()])]
    model = load_model(args.model, given[0].shape[0] if given is not None and given[0].ndim else (args.batch or 1))
    posterior = load_posterior(model, args.posterior)
    shapes = input_shapes(model)
    if given is not None:
        if args.digits:
            from .evaluate.predictors import shape_inputs

            given = [shape_inputs(model, given[0], args.model)]
        if len(given) != len(shapes):
            raise PfpcError(f"{args.model}: {len(given)} --input given, the model takes {len(shapes)} ({', '.join(shapes)})")
        for path, (name, shape), value in zip(args.input or [], shapes.items(), given):
            if list(value.shape) != list(shape):
                raise PfpcError(f"{path}: shape {list(value.shape)}, input '{name}' of the model has {list(shape)}")
        inputs = dict(zip(shapes, given))
    else:
        rng = np.random.default_rng(args.seed)
        inputs = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    batch = next(iter(inputs.values())).shape[0]
    if args.per_layer:
        from .evaluate.report import per_layer_table

        print(f"PFP vs Monte Carlo per layer ({args.samples} samples, batch {batch})\n")
        print(per_layer_table(per_layer(model, posterior, inputs, args.samples, args.seed)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        compile_model(args.model, posterior, out_dir=out, batch=batch)
        pfp = run_host(out, list(inputs.values()))
    names, mc = monte_carlo(model, posterior, inputs, args.samples, args.seed)
    print(f"PFP vs Monte Carlo ({args.samples} samples, batch {batch})")
    print(f"{'output':<16}{'max |dmean|':>14}{'dmean/std':>12}{'max z':>10}{'var rel med':>14}{'var rel max':>14}")
    for name, pair, reference in zip(names, pfp, mc):
        row = compare(pair, reference)
        print(f"{name:<16}{row['mean_abs_err']:>14.4g}{row['mean_err_in_std']:>12.4g}{row['mean_z_max']:>10.3g}"
              f"{row['var_rel_err_median']:>14.4g}{row['var_rel_err_max']:>14.4g}")
    return 0


def _evaluate(args) -> int:
    import shlex

    from .evaluate import evaluate, require_extras
    from .evaluate.datasets import default_suite

    require_extras(plots=bool(args.report))
    if args.samples < 2:
        raise PfpcError(f"--samples {args.samples}: SVI needs at least 2 weight samples")
    try:
        ood_classes = [int(c) for c in args.ood_classes.split(",")] if args.ood_classes else []
    except ValueError:
        raise PfpcError(f"--ood-classes {args.ood_classes}: expected comma-separated class numbers") from None
    sets = default_suite(args.mnist_images, args.mnist_labels, args.limit, ood_classes)
    evaluation = evaluate(args.model, args.posterior, args.samples, sets, args.seed, progress=not args.quiet, per_layer=args.per_layer,
                          svi_repeats=args.svi_repeats)
    from .evaluate.report import approximation_table, metric_tables, svi_spread_table, targets_table, write_report

    print(f"{evaluation.model}: {args.samples} SVI samples, {sum(len(s.x) for s in sets)} images in {len(sets)} sets\n")
    print(targets_table(evaluation) + "\n\n" + approximation_table(evaluation) + "\n")
    if args.svi_repeats:
        print(svi_spread_table(evaluation) + "\n")
    print(metric_tables(evaluation))
    if args.report:
        print(f"\npfpc: wrote {write_report(evaluation, args.report, 'pfpc ' + shlex.join(args.argv))}")
    return 0


def _compress_parser():
    parser = _Parser(prog="pfpc compress", description="Compress a Gaussian posterior into a shared posterior "
                                     "(codebooks of 2-D Gaussian components, stochastic weight sharing) and report what it costs.")
    parser.add_argument("model")
    parser.add_argument("--posterior", required=True, help="the full posterior .npz")
    parser.add_argument("-o", "--output", required=True, help="shared posterior .npz to write")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--components", type=int, help="components per codebook (default 16)")
    size.add_argument("--max-w2", type=float, metavar="EPS", help="instead: the fewest components whose RMS W2 distortion is at most EPS")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--per-layer", dest="per_layer", action="store_true", default=True, help="one codebook per initializer (default)")
    scope.add_argument("--global", dest="per_layer", action="store_false", help="one codebook for all initializers")
    parser.add_argument("--outliers", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of weights (largest W2 to their component) kept individually (default 0)")
    parser.add_argument("--gmm", action="store_true", help="cluster with a Gaussian mixture instead of k-means")
    parser.add_argument("--merge-w2", type=float, default=0.0, metavar="T", help="merge components closer than T (W2) by moment matching")
    parser.add_argument("--precision-weighted", action="store_true",
                        help="k-means weights every point by its precision 1/sigma^2: well-determined weights are kept more exactly")
    parser.add_argument("--blend", type=float, metavar="GAIN",
                        help="alpha-blend a weight between two components when that cuts its W2 error by more than the fraction GAIN")
    parser.add_argument("--blend-levels", type=int, default=0, metavar="L",
                        help="round blend alphas to multiples of 1/L (blended weights then share table entries in the C)")
    parser.add_argument("--channel-scale", action="store_true",
                        help="fit a scale per output channel (least squares) before clustering, e.g. after batch-norm folding")
    parser.add_argument("--min-size", type=int, default=64, help="leave initializers with fewer weights as they are (default 64)")
    parser.add_argument("--target", default="host", help="target whose compiled weight flash is reported (default host)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the end-to-end comparison on the dirty-digits suite")
    parser.add_argument("--report", metavar="FILE", help="also write the report (Markdown) to FILE")
    parser.add_argument("--debug", action="store_true")
    return parser


def _compress(args) -> int:
    import tempfile

    from .compiler import compile as compile_model
    from .compress import Options, compress_posterior
    from .evaluate.compression import compare, format_report
    from .frontends.onnx_model import load_model
    from .frontends.posterior import bind_posterior, load_posterior
    from .frontends.shared_posterior import to_arrays
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise PfpcError("pfpc compress needs scikit-learn: pip install 'pfpc[eval]'")
    options = Options(args.components if args.components is not None or args.max_w2 is not None else 16, args.max_w2,
                      args.per_layer, args.outliers, args.gmm, args.merge_w2, args.min_size,
                      args.precision_weighted, args.blend, args.blend_levels, args.channel_scale)
    model = load_model(args.model, 1)
    full = load_posterior(model, args.posterior)
    shared, layers = compress_posterior(model, full, options)
    arrays = to_arrays(shared)
    shared_post = bind_posterior(model, arrays, args.output)
    flash = {name: compile_model(args.model, post, target=args.target, batch=1, measure=True).footprint["weights_bytes"]
             for name, post in (("full", full), ("shared", shared_post))}
    effect = None if args.no_evaluate else compare(args.model, full, shared_post)
    text = format_report(layers, effect, flash)
    directory = os.path.dirname(os.path.abspath(args.output))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as handle:
        np.savez(handle, **arrays)
    os.replace(handle.name, args.output)
    if args.report:
        with open(args.report, "w") as out:
            out.write(f"# pfpc compress {os.path.basename(args.model)}\n\n`pfpc {' '.join(args.argv)}`\n\n{text}")
    print(f"pfpc: wrote {args.output}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
