"""pfpc: compile a Bayesian neural network (ONNX mean network + Gaussian posterior) into
standalone C that computes the predictive mean and variance in one pass."""

from .compiler import CompiledModel, build_host, compile, run_host  # noqa: A004
from .errors import PfpcError
from .passes.pipeline import default_passes

__all__ = ["compile", "run_host", "build_host", "CompiledModel", "PfpcError", "default_passes"]
__version__ = "0.1.0"
