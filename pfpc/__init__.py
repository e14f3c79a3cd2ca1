"""pfpc: compile a Bayesian neural network (ONNX mean network + Gaussian posterior) into
standalone C that computes the predictive mean and variance in one pass.

The compiler imports TVM; it is loaded on first use of `compile` (so ``import pfpc`` and the
command line's --help, --version and argument errors stay fast)."""

from .errors import PfpcError

__all__ = ["compile", "run", "run_host", "build_host", "CompiledModel", "PfpcError", "default_passes"]
__version__ = "0.1.0"

_LAZY = {"compile": "compiler", "CompiledModel": "compiler", "run": "runner", "run_host": "runner",
         "build_host": "runner", "default_passes": "passes.pipeline"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pfpc' has no attribute {name!r}")
