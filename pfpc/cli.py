"""Command line: ``pfpc MODEL --posterior POST -o OUT``, ``pfpc run``, ``pfpc report``, ``pfpc verify``,
``pfpc evaluate``, ``pfpc bench``."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .errors import PfpcError

COMMANDS = {
    "run": "build the compiled C and run it on .npy inputs: class, probability, uncertainty per example",
    "report": "flash, RAM and arithmetic per layer of a compiled model",
    "verify": "compare the compiled PFP with Monte Carlo sampling of the weights",
    "evaluate": "uncertainty quality (accuracy, NLL, ECE, OOD AUROC) on the dirty-digits suite",
    "bench": "time the PFP against the deterministic network and sampling (SVI)",
    "compress": "compress a posterior into shared codebooks (stochastic weight sharing)",
    "import-posterior": "turn a bayesian-torch/blitz/Pyro/TFP/... checkpoint into a posterior .npz",
    "example": "write a bundled example model and posterior (mlp, lenet) to a directory",
}
# the targets of pfpc.codegen.targets (kept here so that --help needs no import)
TARGET_HELP = ("host (default), arm (= cortex-m4), cortex-m4, cortex-m7, cortex-m55 (bare metal, run under QEMU); "
               "cortex-a53, cortex-a72, aarch64 (Linux)")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2 like every other error (argparse prints the usage block too)."""

    def error(self, message):
        print(f"pfpc: error: {PfpcError(f'{message} (see {self.prog} --help)')}", file=sys.stderr)
        sys.exit(PfpcError.exit_code)


def _version() -> str:
    from . import __version__

    return f"pfpc {__version__}"


def _compile_parser():
    commands = "\n".join(f"  pfpc {name:<17} {text}" for name, text in COMMANDS.items())
    parser = _Parser(
        prog="pfpc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a Bayesian neural network (ONNX mean network + Gaussian posterior .npz) to standalone C "
        "that computes the predictive mean and variance in one probabilistic forward pass (PFP).",
        epilog=f"other commands (pfpc COMMAND --help for their options):\n{commands}\n\n"
        "example:\n  pfpc example mlp -o mlp && pfpc mlp/model.onnx --posterior mlp/post.npz --batch 4 -o out/mlp "
        "&& pfpc run out/mlp --input mlp/sample.npy")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("model", help="ONNX model of the posterior-mean network")
    parser.add_argument("--posterior", help="posterior .npz (<initializer>.std|.var|.logvar|.rho[, .mean]); required unless --deterministic")
    parser.add_argument("--deterministic", action="store_true",
                        help="compile without a posterior: every variance zero (the deterministic network, e.g. as a baseline)")
    parser.add_argument("--target", default="host", help=TARGET_HELP)
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--batch", type=int, help="fixed batch size for a symbolic batch dimension")
    parser.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass into DIR")
    parser.add_argument("--name", default="pfp_model", help="C prefix of the generated library (default pfp_model)")
    parser.add_argument("--outputs", metavar="LIST", default="",
                        help="predictive outputs after the logits' mean and variance, comma-separated: probs (class "
                        "probabilities), entropy (predictive entropy), mutual_information, logit_var (mean logit variance; "
                        "ood is its old name), log_entropy, log_mutual_information (their logs, computed in log space: no "
                        "float32 underflow or ties on confident inputs)")
    parser.add_argument("--probs-method", choices=("meanfield", "sampling", "probit"), default="meanfield",
                        help="how probs and entropy are computed from the Gaussian logits: meanfield (default, closed form), "
                        "sampling (--logit-samples draws on the device), probit (for comparison)")
    parser.add_argument("--logit-samples", type=int, default=64,
                        help="draws of the logits per call for --probs-method sampling and for mutual_information (default 64)")
    parser.add_argument("--moment-storage", choices=("float32", "bfloat16"), default="float32",
                        help="how the variances between layers are stored in the arena: float32 (default) or bfloat16 "
                        "(half their RAM; 8 significant bits, see the README's memory section)")
    parser.add_argument("--covariance", choices=("auto", "none", "channel", "pooled"), default="auto",
                        help="per-channel shared weight noise of convolutional networks (docs/covariance.md): auto (default: "
                        "only where it can reach a global average pool, from the earliest convolution within "
                        "--covariance-budget), channel (every such convolution), pooled (cheaper: the loadings feed only "
                        "the pooled variances), none (the diagonal PFP)")
    parser.add_argument("--covariance-budget", type=float, default=0.5,
                        help="extra Cortex-M4 instructions (estimated) --covariance auto may add, as a fraction of the "
                             "diagonal PFP's (default 0.5)")
    parser.add_argument("--shared-scale", choices=("auto", "on", "off"), default="auto",
                        help="one random scale shared by the units of a noise-dominated dense layer after a convolution, the "
                        "layers after it run in two scenarios (docs/covariance.md): auto (default: where the dense weights are "
                        "mostly noise, within --covariance-budget; not with --covariance none), on (wherever the layout allows), off")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory that pfpc wrote")
    parser.add_argument("--mode", choices=("pfp", "svi"), default="pfp",
                        help="pfp (default): one probabilistic forward pass; svi: the same API computed by sampling the weights")
    parser.add_argument("--samples", type=int, help="with --mode svi: weight samples per call (default 100; -D<NAME>_SAMPLES overrides)")
    parser.add_argument("--seed", type=int, help="with --mode svi: seed of the on-device generator (default 0)")
    parser.add_argument("--ram-limit", metavar="BYTES", help="RAM of the device (e.g. 256K): the most accurate plan whose arena + stack fit, from "
                        "the --covariance-budget and --moment-storage asked for down (one line says which); none: exit 2")
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
    parser.add_argument("--cycles-target", default="cortex-m4",
                        help="comma-separated Cortex-M targets for instruction counts under QEMU ('' for none)")
    parser.add_argument("--cycles-samples", help="SVI-C sample counts run under QEMU (default: --samples)")
    parser.add_argument("--no-best", action="store_true", help="only the generated Makefile's flags, not also the best ones")
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
    from .codegen.targets import get_target
    from .frontends.onnx_model import fixed_batch

    batches, samples = _int_list(args.batches, "--batches"), _int_list(args.samples, "--samples")
    fixed = fixed_batch(args.model)
    if fixed not in (None, 1) and set(batches) != {fixed}:
        # a batch-1 export is re-batched at each batch (frontends/rebatch.py); any other fixed batch is not
        raise PfpcError(f"{args.model}: its inputs have the fixed batch {fixed}, so --batches can only be {fixed}: export "
                        "the model with a symbolic batch dimension (torch.onnx.export's dynamic_axes) to time other batches")
    if min(samples) < 2:
        raise PfpcError("--samples: SVI needs at least 2 samples")
    inputs = _load_npy(args.input) if args.input else None
    cycles_samples = _int_list(args.cycles_samples, "--cycles-samples") if args.cycles_samples else samples
    targets = [t.strip() for t in args.cycles_target.split(",") if t.strip()]
    for target in targets:
        get_target(target)  # an unknown name is a one-line error before any timing
    result = benchmark_model(args.model, args.posterior, batches, samples, inputs, tvm_vm=not args.no_tvm, cycles_target=targets,
                             best=not args.no_best, cycles_samples=cycles_samples,
                             progress=lambda text: print(f"pfpc bench: {text}", file=sys.stderr))
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
                                     "(--emulate) for its target under QEMU; prints per example the predicted class, "
                                     "its probability and the uncertainty scores.")
    parser.add_argument("out_dir")
    parser.add_argument("--input", required=True, action="append", help=".npy input (repeat for several inputs)")
    parser.add_argument("--output", help=".npz to write: mean and var (mean_<i>, var_<i> for several outputs; an output "
                        "computed by a final softmax: softmax or log_softmax, logits_mean, logits_var), "
                        "and the predictive outputs (probs, entropy, ...) if compiled with --outputs")
    parser.add_argument("--json", action="store_true", help="print JSON (one object) instead of text")
    parser.add_argument("--emulate", action="store_true", help="build for the compiled target and run under QEMU")
    parser.add_argument("--cycles", action="store_true", help="with --emulate on Cortex-M: print instructions executed "
                        "under QEMU and peak stack per call")
    parser.add_argument("--profile", action="store_true", help="with --emulate on Cortex-M: instructions per layer "
                        "(counter reads around every kernel call; implies --cycles)")
    parser.add_argument("--clock-mhz", type=float, metavar="MHZ", help="with --cycles/--profile: also estimate milliseconds "
                        "per call at this core clock")
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
    parser.add_argument("model", help="ONNX classifier with one input and one [N, classes] output (the dirty-digits "
                        "suite needs 8x8 digits: [N, 64] or [N, 1, 8, 8]; any shape with --test)")
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--samples", type=int, default=100, help="SVI weight samples (default 100)")
    parser.add_argument("--test", metavar="SET", help="your in-distribution test set instead of the digits suite: a .npz "
                        "with x and y, IDX images followed by ',LABELS' (IDX), or a folder of images in class sub-folders 0/, 1/, ...")
    parser.add_argument("--ood", metavar="NAME=SET", action="append", default=[],
                        help="a named out-of-distribution set (.npy, .npz with x, IDX images or a folder of images); repeatable")
    parser.add_argument("--scale", type=float, help="preprocessing of --test/--ood: multiply the raw values (e.g. 0.00392156862745098 for 1/255)")
    parser.add_argument("--mean", help="then subtract this mean (one value or one per channel, comma-separated)")
    parser.add_argument("--std", help="then divide by this std (one value or one per channel)")
    parser.add_argument("--layout", choices=("nchw", "nhwc"), help="layout of the sets' images (nhwc is transposed to the model's nchw)")
    parser.add_argument("--preprocess", metavar="JSON", help="the preprocessing as JSON {scale, mean, std, layout} "
                        "(default: preprocess.json beside the model if present); --scale/--mean/--std/--layout override it")
    parser.add_argument("--save-preprocess", metavar="JSON", help="write the preprocessing used to this JSON file (e.g. beside the compiled model)")
    parser.add_argument("--thresholds-into", metavar="OUT_DIR", help="write the PFP's abstain thresholds as #defines into the header of this compiled model "
                        "(<NAME>_ABSTAIN_<SCORE>_COV<percent>, also for the log-space outputs LOG_ENTROPY and LOG_MUTUAL_INFORMATION)")
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
               "import-posterior": _import_parser, "example": _example_parser}
    args = parsers[command]().parse_args(
        argv[1:] if command != "compile" else argv
    )
    args.argv = argv
    from . import progress

    progress.show_on_terminal()
    progress.current[0] = f"pfpc {command}"
    signalled = []
    previous = _catch_signals(signalled)
    try:
        return {"compile": _compile, "run": _run, "verify": _verify, "report": _report, "bench": _bench,
                "evaluate": _evaluate, "compress": _compress, "import-posterior": _import_posterior,
                "example": _example}[command](args)
    except PfpcError as err:
        if signalled:
            return _interrupted(signalled)
        if args.debug:
            raise
        print(f"pfpc: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # the reader of our stdout went away (`pfpc run | head`): stop quietly, as a Unix filter does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return _interrupted(signalled or [2])
    except Exception as err:  # a bug in pfpc (or TVM): one line naming the stage, exit code 3
        if signalled:  # an interrupt that TVM's FFI turned into another exception
            return _interrupted(signalled)
        if args.debug:
            raise
        from .errors import one_line

        print(f"pfpc: internal error while {progress.current[0]}: {type(err).__name__}: {one_line(err)[:400]} "
              "(a bug in pfpc: please report it; --debug shows the traceback)", file=sys.stderr)
        return 3
    finally:
        _restore_signals(previous)


def _catch_signals(signalled):
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so that the atomic writer
    removes its staging directory; further signals are ignored while that cleanup runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        signalled.append(signum)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signals(previous):
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _interrupted(signalled) -> int:
    import signal

    name = "SIGTERM" if signalled[0] == signal.SIGTERM else "SIGINT"
    print(f"pfpc: interrupted ({name}); nothing was written", file=sys.stderr)
    return 128 + int(signalled[0])


def _compile(args) -> int:
    from .options import parse_bytes

    ram_limit = parse_bytes(args.ram_limit, "--ram-limit") if args.ram_limit else None
    flash_limit = parse_bytes(args.flash_limit, "--flash-limit") if args.flash_limit else None
    if args.posterior and args.deterministic:
        raise PfpcError("give --posterior or --deterministic, not both")
    if not args.posterior and not args.deterministic:
        _refuse_missing_posterior(args)
    from .progress import step

    with step("loading TVM"):
        from .codegen.footprint import format_report
        from .compiler import compile as compile_model

    result = compile_model(
        args.model, args.posterior, target=args.target, out_dir=args.output, batch=args.batch,
        dump_ir=args.dump_ir, name=args.name, force=args.force, measure=True, ram_limit=ram_limit, flash_limit=flash_limit,
        mode=args.mode, samples=args.samples, seed=args.seed, outputs=[o for o in args.outputs.split(",") if o],
        probs_method=args.probs_method, logit_samples=args.logit_samples, moment_storage=args.moment_storage,
        covariance=args.covariance, covariance_budget=args.covariance_budget, shared_scale=args.shared_scale,
    )
    sampling = result.program.sampling
    detail = f" run once per sample, {sampling.samples} samples (SVI)" if sampling else ""
    kind = " (deterministic network: every variance is zero)" if args.deterministic else ""
    if result.footprint.get("ram_plan"):
        print(f"pfpc: {result.footprint['ram_plan']}")
    print(f"pfpc: wrote {args.output}: {len(result.program.steps)} kernels{detail}{kind}")
    print(format_report(result.footprint, args.name))
    return 0


def _refuse_missing_posterior(args):
    """Without a posterior the compiled network reports zero variance (certainty) on every input:
    a silent trap, so it must be asked for (checked first: it needs no TVM and no model)."""
    raise PfpcError(f"{args.model}: no --posterior given: the compiled network would report zero variance (certainty) "
                    "on every input; give the weight posterior (--posterior POST.npz, see pfpc import-posterior) or "
                    "--deterministic to compile the deterministic network on purpose")


def _example_parser():
    parser = _Parser(prog="pfpc example", description="Write a bundled example (ONNX model, posterior, sample inputs "
                                     "and their labels) to a directory.")
    parser.add_argument("name", choices=("mlp", "lenet"), help="mlp: 64-64-32-10 MLP; lenet: small CNN; both on 8x8 digits")
    parser.add_argument("-o", "--output", help="directory to write (default: the example's name)")
    parser.add_argument("--force", action="store_true", help="replace a directory pfpc wrote")
    parser.add_argument("--debug", action="store_true")
    return parser


def _example(args) -> int:
    import shutil

    from . import __version__
    from .atomic import write_directory

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", args.name)
    out = args.output or args.name

    def fill(staging):
        for name in sorted(os.listdir(source)):
            if not name.startswith(("_", ".")):
                shutil.copy(os.path.join(source, name), staging)

    write_directory(out, fill, force=args.force, version=__version__)
    print(f"pfpc: wrote {out}: model.onnx, post.npz, sample.npy (inputs), sample_labels.npy\n"
          f"next: pfpc {out}/model.onnx --posterior {out}/post.npz --batch 4 -o {out}/c && "
          f"pfpc run {out}/c --input {out}/sample.npy")
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
    import json

    from .codegen.targets import get_target
    from .predictions import describe, readable
    from .runner import read_metadata, run

    _check_out_dir(args.out_dir)
    counting = args.cycles or args.profile
    if counting and not args.emulate:
        raise PfpcError(f"--{'profile' if args.profile else 'cycles'} needs --emulate (instructions are counted on the emulated Cortex-M)")
    if args.clock_mhz is not None and not counting:
        raise PfpcError("--clock-mhz needs --cycles or --profile (it converts their instruction counts)")
    if args.clock_mhz is not None and not args.clock_mhz > 0:
        raise PfpcError(f"--clock-mhz {args.clock_mhz}: must be a positive clock in MHz")
    meta = read_metadata(args.out_dir)
    if counting:
        compiled_for = meta.get("target", "host")
        if not get_target(compiled_for).bare_metal:
            raise PfpcError(f"{args.out_dir}: --{'profile' if args.profile else 'cycles'} needs a Cortex-M target (compiled for {compiled_for})")
    inputs = [_load_npy(p) for p in args.input]
    outcome = run(args.out_dir, inputs, emulate=args.emulate, profile=args.profile)
    results, extras = outcome.outputs, outcome.extras
    if args.output:
        from .atomic import write_file

        arrays = {}
        softmax = {entry["output"]: entry["function"] for entry in meta.get("output_softmax", [])}
        for index, (mean, var) in enumerate(results):
            suffix = "" if len(results) == 1 else f"_{index}"
            if var is None:  # a softmax output: its value, and its logits' moments
                arrays[f"{softmax[index]}{suffix}"] = mean
                arrays[f"logits_mean{suffix}"], arrays[f"logits_var{suffix}"] = outcome.logits[index]
            else:
                arrays[f"mean{suffix}"], arrays[f"var{suffix}"] = mean, var
        arrays.update(extras)
        write_file(args.output, lambda stream: np.savez(stream, **arrays), "predictions")
    report = describe(meta, results, extras, outcome.logits)
    cost = _cost(outcome, args.clock_mhz, get_target(meta.get("target", "host"))) if counting else None
    if args.json:
        print(json.dumps({**report, **({"cost": cost} if cost else {})}, indent=1))
        return 0
    print(readable(report))
    if cost:
        print(_readable_cost(cost))
    if args.output:
        print(f"pfpc: wrote {args.output}")
    return 0


def _cost(outcome, clock_mhz, target) -> dict:
    """Instruction counts per call (and per layer) with the assumptions they rest on."""
    cost = {"instructions_per_call": outcome.cycles, "median_instructions": int(np.median(outcome.cycles)),
            "peak_stack_bytes": max(outcome.stack_bytes),
            "counted_as": f"instructions executed under QEMU ({target.qemu_machine}, -icount shift=0), read from SysTick at "
                          f"{target.instructions(1)} instructions per tick"}
    if outcome.layers:
        cost["layers"] = outcome.layers
    if clock_mhz:
        cost["clock_mhz"] = clock_mhz
        cost["estimated_ms"] = cost["median_instructions"] / (clock_mhz * 1e3)
        cost["assumes"] = ("one instruction per clock cycle; a real core spends more on flash wait states, loads, "
                           "divisions, square roots and branches (expect 1.2-2x on a Cortex-M4 running from flash)")
    return cost


def _readable_cost(cost) -> str:
    lines = [f"instructions per call (QEMU, one per instruction executed): {' '.join(map(str, cost['instructions_per_call']))}; "
             f"median {cost['median_instructions']}",
             f"peak stack per call (painted, libm included): {cost['peak_stack_bytes']} bytes"]
    if cost.get("layers"):
        width = max(len(layer["function"]) for layer in cost["layers"])
        total = sum(layer["instructions"] for layer in cost["layers"])
        lines.append(f"{'layer':<{width}}  {'instructions':>14}  share")
        for layer in cost["layers"]:
            lines.append(f"{layer['function']:<{width}}  {layer['instructions']:>14,}  {layer['instructions'] / max(total, 1):6.1%}")
        lines.append(f"{'total':<{width}}  {total:>14,}  (the first call, in the profiled build: each counter read adds about "
                     "20 instructions)")
    if cost.get("estimated_ms") is not None:
        lines.append(f"estimated {cost['estimated_ms']:.3f} ms per call at {cost['clock_mhz']:g} MHz, assuming {cost['assumes']}")
    return "\n".join(lines)


def _verify(args) -> int:
    import tempfile

    from .compiler import compile as compile_model
    from .frontends.onnx_model import input_shapes, load_model
    from .frontends.posterior import load_posterior
    from .runner import read_metadata, run
    from .verify import compare, final_softmax, monte_carlo, per_layer, softmax_probs

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
        result = run(out, list(inputs.values()))
        meta = read_metadata(out)
    names, mc = monte_carlo(model, posterior, inputs, args.samples, args.seed, keep_softmax=True)
    mc = dict(zip(names, mc))
    print(f"PFP vs Monte Carlo ({args.samples} samples, batch {batch})")
    print(f"{'output':<16}{'max |dmean|':>14}{'dmean/std':>12}{'max z':>10}{'var rel med':>14}{'var rel max':>14}"
          f"{'var PFP/MC med':>16}")

    def row(label, pair, reference):
        cells = compare(pair, reference)
        variance = (f"{cells['var_rel_err_median']:>14.4g}{cells['var_rel_err_max']:>14.4g}{cells['var_ratio_median']:>16.4g}"
                    if pair[1] is not None else f"{'-':>14}{'-':>14}{'-':>16}")
        print(f"{label:<16}{cells['mean_abs_err']:>14.4g}{cells['mean_err_in_std']:>12.4g}{cells['mean_z_max']:>10.3g}{variance}")

    softmax = {entry["output"]: entry for entry in meta.get("output_softmax", [])}
    for index, ((name, _), pair) in enumerate(zip(meta["outputs"], result.outputs)):
        if index not in softmax:
            row(name, pair, mc[name])
            continue
        # the probabilities against the mean of the sampled softmax; the logits against their samples
        log = softmax[index]["function"] == "log_softmax"
        probs = np.exp(pair[0].astype(np.float64)) if log else pair[0]
        row(f"{name}:probabilities", (probs, None), mc[softmax_probs(name) if log else name])
        row(f"{name}:logits", result.logits[index], mc[final_softmax(model.graph, name).input[0]])
    return 0


def _preprocess(args):
    """The preprocessing of --test/--ood: a JSON spec (given, or preprocess.json beside the model)
    with the command line's options on top; saved if asked."""
    from .evaluate.datasets import Preprocess

    beside = os.path.join(os.path.dirname(os.path.abspath(args.model)), "preprocess.json")
    spec = Preprocess.load(args.preprocess) if args.preprocess else Preprocess.load(beside) if os.path.exists(beside) else Preprocess()

    def values(text, option):
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise PfpcError(f"--{option} {text}: expected comma-separated numbers") from None

    if args.scale is not None:
        spec.scale = args.scale
    if args.mean:
        spec.mean = values(args.mean, "mean")
    if args.std:
        spec.std = values(args.std, "std")
    if args.layout:
        spec.layout = args.layout
    if args.save_preprocess:
        spec.save(args.save_preprocess)
    return spec


def _evaluate(args) -> int:
    import shlex

    from .evaluate import evaluate, require_extras
    from .evaluate.datasets import default_suite, user_suite

    require_extras(plots=bool(args.report))
    if args.samples < 2:
        raise PfpcError(f"--samples {args.samples}: SVI needs at least 2 weight samples")
    try:
        ood_classes = [int(c) for c in args.ood_classes.split(",")] if args.ood_classes else []
    except ValueError:
        raise PfpcError(f"--ood-classes {args.ood_classes}: expected comma-separated class numbers") from None
    if args.test:
        sets = user_suite(args.test, args.ood, _preprocess(args), args.limit)
    elif args.ood:
        raise PfpcError("--ood needs --test (your in-distribution test set)")
    else:
        sets = default_suite(args.mnist_images, args.mnist_labels, args.limit, ood_classes)
    evaluation = evaluate(args.model, args.posterior, args.samples, sets, args.seed, progress=not args.quiet, per_layer=args.per_layer,
                          svi_repeats=args.svi_repeats)
    from .evaluate.report import approximation_table, metric_tables, svi_spread_table, targets_table, threshold_table, write_report

    print(f"{evaluation.model}: {args.samples} SVI samples, {sum(len(s.x) for s in sets)} images in {len(sets)} sets\n")
    print(targets_table(evaluation) + "\n\n" + approximation_table(evaluation) + "\n")
    if args.svi_repeats:
        print(svi_spread_table(evaluation) + "\n")
    print(metric_tables(evaluation) + "\n\n" + threshold_table(evaluation))
    if args.thresholds_into:
        from .evaluate.report import write_threshold_defines

        print(f"pfpc: wrote the thresholds into {write_threshold_defines(evaluation, args.thresholds_into)}")
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
    from .atomic import write_file
    from .compiler import compile as compile_model
    from .compress import Options, compress_posterior
    from .evaluate.compression import compare, format_report
    from .frontends.onnx_model import batch_or_default, load_model
    from .frontends.posterior import bind_posterior, load_posterior
    from .frontends.shared_posterior import to_arrays
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise PfpcError("pfpc compress needs scikit-learn: pip install 'pfpc[eval]'")
    options = Options(args.components if args.components is not None or args.max_w2 is not None else 16, args.max_w2,
                      args.per_layer, args.outliers, args.gmm, args.merge_w2, args.min_size,
                      args.precision_weighted, args.blend, args.blend_levels, args.channel_scale)
    model = load_model(args.model, 1, shapes_only=True)
    full = load_posterior(model, args.posterior)
    shared, layers = compress_posterior(model, full, options)
    arrays = to_arrays(shared)
    shared_post = bind_posterior(model, arrays, args.output)
    batch = batch_or_default(args.model)
    flash = {name: compile_model(args.model, post, target=args.target, batch=batch, measure=True).footprint["weights_bytes"]
             for name, post in (("full", full), ("shared", shared_post))}
    effect = None if args.no_evaluate else compare(args.model, full, shared_post)
    text = format_report(layers, effect, flash)
    write_file(args.output, lambda stream: np.savez(stream, **arrays), "shared posterior")
    if args.report:
        with open(args.report, "w") as out:
            out.write(f"# pfpc compress {os.path.basename(args.model)}\n\n`pfpc {' '.join(args.argv)}`\n\n{text}")
    print(f"pfpc: wrote {args.output}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
