"""Compile time against graph size: a chain of blocks (MatMul with a Gaussian weight, Add of a
Gaussian bias, an activation: Relu, LeakyRelu, Relu, Clip, Relu in turn; every fifth block
a residual Add of the block's input) of width 16, compiled with ``pfpc.compile`` (no C build).
Prints one row per size: nodes, kernels (and how many of them TVM compiled; the others reuse an
earlier kernel's C), the process's CPU seconds in total and in the three heaviest steps (CPU time:
the machine is shared, wall time depends on its load), and the wall seconds. ``--plan N ...``
times the memory plan alone on N arena tensors; ``--resnet8`` times the compile of the MLPerf
Tiny ResNet-8 of tests/architectures.py (its std = 0.1 |mean| + 0.001 posterior; host, batch 1,
default options: what `pfpc bench` compiles first).

    python3 benchmarks/compile_time.py                      # 250 500 1000 2000 4000 10000 nodes
    python3 benchmarks/compile_time.py --nodes 500 1000 --profile 1000
    python3 benchmarks/compile_time.py --nodes --resnet8
    python3 benchmarks/compile_time.py --nodes --activations Softplus SiLU Gelu GeluTanh Elu

``--activations`` times the compile of one Gaussian bias -> activation layer (64 elements) each:
the smooth activations' Gauss-Hermite kernels (session 11).

The latest results are in benchmarks/compile_time.md.
"""

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pfpc  # noqa: E402
from pfpc import compiler, progress  # noqa: E402
from pfpc.codegen import kernels, memory_plan  # noqa: E402

WIDTH = 16
ACTIVATIONS = ("Relu", "LeakyRelu", "Relu", "Clip", "Relu")


def chain(nodes: int, seed: int = 0):
    """A valid ONNX model of about ``nodes`` nodes and its posterior (mean/std per weight)."""
    rng = np.random.default_rng(seed)
    graph_nodes, inits, posterior = [], [], {}
    x = "x"
    block = 0
    while len(graph_nodes) < nodes:
        w, b = f"w{block}", f"b{block}"
        w_mean = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        b_mean = (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
        inits += [numpy_helper.from_array(w_mean, w), numpy_helper.from_array(b_mean, b)]
        posterior[f"{w}.mean"], posterior[f"{w}.std"] = w_mean, (0.1 * np.abs(w_mean) + 0.01).astype(np.float32)
        posterior[f"{b}.mean"], posterior[f"{b}.std"] = b_mean, np.full(WIDTH, 0.01, np.float32)
        graph_nodes.append(helper.make_node("MatMul", [x, w], [f"mm{block}"]))
        graph_nodes.append(helper.make_node("Add", [f"mm{block}", b], [f"lin{block}"]))
        act = ACTIVATIONS[block % len(ACTIVATIONS)]
        attrs = {"alpha": 0.1} if act == "LeakyRelu" else {}
        inputs = [f"lin{block}"]
        if act == "Clip":
            lo, hi = f"lo{block}", f"hi{block}"
            inits += [numpy_helper.from_array(np.array(-2.0, np.float32), lo),
                      numpy_helper.from_array(np.array(2.0, np.float32), hi)]
            inputs += [lo, hi]
        graph_nodes.append(helper.make_node(act, inputs, [f"act{block}"], **attrs))
        y = f"act{block}"
        if block % 5 == 4:
            graph_nodes.append(helper.make_node("Add", [y, x], [f"res{block}"]))
            y = f"res{block}"
        x = y
        block += 1
    graph_nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(graph_nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model, posterior


def activation_layer(name: str):
    """Add of a Gaussian bias (std 0.1) -> the activation ``name`` on 64 elements, and its posterior."""
    nodes = {"Relu": [helper.make_node("Relu", ["h"], ["y"])], "Softplus": [helper.make_node("Softplus", ["h"], ["y"])], "Elu": [helper.make_node("Elu", ["h"], ["y"])],
             "SiLU": [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["y"])],
             "Gelu": [helper.make_node("Gelu", ["h"], ["y"])], "GeluTanh": [helper.make_node("Gelu", ["h"], ["y"], approximate="tanh")],
             "Sigmoid": [helper.make_node("Sigmoid", ["h"], ["y"])], "Tanh": [helper.make_node("Tanh", ["h"], ["y"])]}[name]
    bias = np.zeros((1, 64), np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["h"])] + nodes, name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return model, {"b.mean": bias, "b.std": np.full(bias.shape, 0.1, np.float32)}


def timed_compile(model, posterior, **options):
    """(CPU seconds, wall seconds, {step: CPU seconds}, [kernels, of which TVM compiled]) of one compile."""
    steps, counts = {}, [0, 0]
    original = progress.step
    same_kernels = kernels._same_kernels

    def counting(prim_funcs):
        compiled, copies = same_kernels(prim_funcs)
        counts[0] += len(prim_funcs) if not counts[0] else 0
        counts[1] += len(compiled)
        return compiled, copies

    import contextlib

    @contextlib.contextmanager
    def timing_step(name, show=None):
        started = time.process_time()
        with original(name, show):
            yield
        steps[name] = steps.get(name, 0.0) + time.process_time() - started

    compiler.step, kernels._same_kernels = timing_step, counting
    try:
        started, wall = time.process_time(), time.perf_counter()
        pfpc.compile(model, posterior, **options)
        return time.process_time() - started, time.perf_counter() - wall, steps, counts
    finally:
        compiler.step, kernels._same_kernels = original, same_kernels


def plan_times(sizes):
    """Seconds of `memory_plan.plan` on the arena tensors of a chain (each read by the next step,
    every fifth also by a residual add four steps later)."""
    for count in sizes:
        intervals = [memory_plan.Interval(f"t{i}", 64 * (1 + i % 3), i, i + 1 + (3 if i % 5 == 4 else 0)) for i in range(count)]
        started = time.perf_counter()
        memory_plan.plan(intervals)
        print(f"| {count} | {time.perf_counter() - started:.2f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[250, 500, 1000, 2000, 4000, 10000])
    parser.add_argument("--resnet8", action="store_true", help="time the compile of ResNet-8 (tests/architectures.py)")
    parser.add_argument("--profile", type=int, help="run cProfile on the compile of this many nodes")
    parser.add_argument("--plan", type=int, nargs="+", help="time only the memory plan of this many tensors")
    parser.add_argument("--activations", nargs="*", default=[], help="time one bias -> activation layer each (Softplus, SiLU, Gelu, ...)")
    args = parser.parse_args(argv)
    if args.plan:
        print("| arena tensors | memory plan (s) |\n|---:|---:|")
        plan_times(args.plan)
        return
    if args.profile:
        import cProfile
        import pstats

        model, posterior = chain(args.profile)
        profiler = cProfile.Profile()
        profiler.enable()
        pfpc.compile(model, posterior)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    print("| nodes | kernels (compiled by TVM) | compile, CPU (s) | CPU s per 1,000 nodes | heaviest steps, CPU (s) | wall (s) |")
    print("|---:|---:|---:|---:|---|---:|")

    def rows():
        for nodes in args.nodes:
            model, posterior = chain(nodes)
            yield len(model.graph.node), model, posterior, {}
        if args.resnet8:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            import architectures

            model = architectures.build_onnx("resnet8")
            yield "ResNet-8", model, architectures.posterior(model), {"batch": 1}
        for name in args.activations:
            model, posterior = activation_layer(name)
            yield f"{name} layer", model, posterior, {"batch": 1}

    for count, model, posterior, options in rows():
        total, wall, steps, (kernel_count, compiled) = timed_compile(model, posterior, **options)
        heaviest = sorted(steps.items(), key=lambda item: -item[1])[:3]
        listed = ", ".join(f"{name} {seconds:.1f}" for name, seconds in heaviest)
        per_node = f"{1000 * total / count:.1f}" if isinstance(count, int) else "-"
        print(f"| {count} | {kernel_count} ({compiled}) | {total:.1f} | {per_node} | {listed} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
