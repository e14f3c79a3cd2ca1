"""The effect of each kernel optimisation, measured side by side in one run: the examples compiled
(host, batch 1) by pfpc as it was at each commit below, timed with today's harness, interleaved.

    python3 benchmarks/optimisation_log.py      # prints a Markdown table (needs the git history)
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pfpc.bench import build_timer, time_binaries  # noqa: E402

STEPS = [
    ("0ecb60f", "baseline: one loop nest per kernel, erf/exp repeated per moment, max-pool by a 3-tuple reducer"),
    ("5d50551", "ReLU/Clark terms computed once per element (shared stages), max-pool as a chain of Clark steps"),
    ("5ea86e4", "'row' schedule on the host: reduction loops outside the output row, vectorisable inner loop"),
    ("f7ca4e3", "Phi from phi by A&S 26.2.17: no erf, one exp per element"),
    ("2f67588", "operator coverage, hostile-name taming, codebooks merged (no kernel change intended)"),
    ("5f0a03b", "ReLU epilogue split into vectorisable stages; only exp stays scalar"),
    ("61c66f6", "padded convolutions read a padded copy (pad kernel): no border branches in the MAC loops"),
    ("8f8d06c", "Clark steps in stages; element-wise kernels in rows, one loop per stage"),
    ("2889baa", "restrict kernel parameters; phi's exp without libm (vectorisable)"),
    ("222cf67", "kernel window unrolled; ReLU's standard deviation computed once"),
    ("8069673", "max-pool before its ReLU (PoolBeforeRelu: 1,152 -> 672 nonlinearities on LeNet), pool + ReLU one kernel"),
    ("HEAD", "phi's 2^n by a bit copy (no bit-selects); phi = 0 beyond |z| = 7.75, so no subnormal floats downstream"),
]

COMPILE = """
import sys, pfpc.compiler as c
for example in ("mlp", "lenet"):
    base = f"{sys.argv[1]}/examples/{example}"
    c.compile(f"{base}/model.onnx", f"{base}/post.npz", out_dir=f"{sys.argv[2]}/{example}_pfp", batch=1)
    c.compile(f"{base}/model.onnx", None, out_dir=f"{sys.argv[2]}/{example}_det", batch=1)
"""


def table() -> str:
    """The Markdown table of the kernel optimisations, measured now."""
    with tempfile.TemporaryDirectory() as tmp:
        binaries = {}
        for commit, _ in STEPS:
            tree = os.path.join(tmp, commit)
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, commit], check=True)
            try:
                out = os.path.join(tmp, f"out_{commit}")
                subprocess.run([sys.executable, "-c", COMPILE, tree, out], check=True, cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                               capture_output=True)
                for example in ("mlp", "lenet"):
                    for kind in ("pfp", "det"):
                        name = f"{example}_{kind}"
                        binaries[(commit, example, kind)] = build_timer(os.path.join(out, name), os.path.join(tmp, f"t_{commit}_{name}"))
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=True)
        inputs = {example: np.load(os.path.join(ROOT, "examples", example, "sample.npy"))[:1] for example in ("mlp", "lenet")}
        times = {}
        for example in ("mlp", "lenet"):
            times.update({key: value for key, value in time_binaries(
                {key: path for key, path in binaries.items() if key[1] == example}, [inputs[example]], repeats=7).items()})
    lines = ["| commit | change | MLP PFP µs | MLP det. µs | MLP PFP/det | LeNet PFP µs | LeNet det. µs | LeNet PFP/det |",
             "|---|---|---|---|---|---|---|---|"]
    for commit, change in STEPS:
        cells = []
        for example in ("mlp", "lenet"):
            pfp, det = times[(commit, example, "pfp")] / 1e3, times[(commit, example, "det")] / 1e3
            cells += [f"{pfp:.2f}", f"{det:.2f}", f"{pfp / det:.2f}"]
        lines.append(f"| {commit} | {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table())
