"""Command line: ``pfpc MODEL --posterior POST -o OUT``, ``pfpc run``, ``pfpc verify``."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .errors import PfpcError

COMMANDS = ("run", "verify")


def _compile_parser():
    parser = argparse.ArgumentParser(prog="pfpc", description="Compile a Bayesian neural network to standalone C (one-pass PFP).")
    parser.add_argument("model", help="ONNX model of the posterior-mean network")
    parser.add_argument("--posterior", help="posterior .npz (<initializer>.std|.var|.logvar|.rho[, .mean])")
    parser.add_argument("--target", default="host", help="host (default), arm, ...")
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--batch", type=int, help="fixed batch size for a symbolic batch dimension")
    parser.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass into DIR")
    parser.add_argument("--name", default="pfp_model", help="C prefix of the generated library (default pfp_model)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _run_parser():
    parser = argparse.ArgumentParser(prog="pfpc run", description="Build the generated C for the host and run it.")
    parser.add_argument("out_dir")
    parser.add_argument("--input", required=True, action="append", help=".npy input (repeat for several inputs)")
    parser.add_argument("--output", required=True, help=".npz to write: mean and var (mean_<i>, var_<i> for several outputs)")
    parser.add_argument("--debug", action="store_true")
    return parser


def _verify_parser():
    parser = argparse.ArgumentParser(prog="pfpc verify", description="Compare the compiled PFP with Monte Carlo sampling.")
    parser.add_argument("model")
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--input", help=".npy input; default: the first batch of standard-normal inputs")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "compile"
    args = {"compile": _compile_parser, "run": _run_parser, "verify": _verify_parser}[command]().parse_args(
        argv[1:] if command != "compile" else argv
    )
    try:
        return {"compile": _compile, "run": _run, "verify": _verify}[command](args)
    except PfpcError as err:
        if args.debug:
            raise
        print(f"pfpc: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _compile(args) -> int:
    from .compiler import compile as compile_model

    result = compile_model(
        args.model, args.posterior, target=args.target, out_dir=args.output, batch=args.batch,
        dump_ir=args.dump_ir, name=args.name, force=args.force,
    )
    program = result.program
    print(f"pfpc: wrote {args.output}: {len(program.steps)} kernels, arena {program.arena_size} bytes "
          f"(lower bound {program.arena_lower_bound}), weights {sum(v.size for v, _ in program.weights.values()) * 4} bytes")
    return 0


def _load_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PfpcError(f"{path}: no such input file") from None
    except Exception as err:
        raise PfpcError(f"{path}: not a readable .npy array ({err})") from None


def _run(args) -> int:
    from .compiler import run_host

    if not os.path.exists(os.path.join(args.out_dir, "pfpc.json")):
        raise PfpcError(f"{args.out_dir}: not a directory written by pfpc (no pfpc.json)")
    inputs = [_load_npy(p) for p in args.input]
    results = run_host(args.out_dir, inputs)
    arrays = {}
    for index, (mean, var) in enumerate(results):
        suffix = "" if len(results) == 1 else f"_{index}"
        arrays[f"mean{suffix}"], arrays[f"var{suffix}"] = mean, var
    np.savez(args.output, **arrays)
    for index, (mean, var) in enumerate(results):
        print(f"output {index}: mean {np.array2string(mean, precision=4, threshold=40)}")
        print(f"output {index}: var  {np.array2string(var, precision=4, threshold=40)}")
    return 0


def _verify(args) -> int:
    import tempfile

    from .compiler import compile as compile_model
    from .compiler import run_host
    from .frontends.onnx_model import input_shapes, load_model
    from .frontends.posterior import load_posterior
    from .verify import compare, monte_carlo

    given = _load_npy(args.input).astype(np.float32) if args.input else None
    model = load_model(args.model, given.shape[0] if given is not None else (args.batch or 1))
    posterior = load_posterior(model, args.posterior)
    shapes = input_shapes(model)
    if given is not None:
        inputs = {next(iter(shapes)): given}
    else:
        rng = np.random.default_rng(args.seed)
        inputs = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    batch = next(iter(inputs.values())).shape[0]
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


if __name__ == "__main__":
    sys.exit(main())
