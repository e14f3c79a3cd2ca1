"""blitz (blitz-bayesian-pytorch): BayesianLinear, BayesianConv1d/2d/3d.

Layers store ``weight_mu``/``weight_rho`` and ``bias_mu``/``bias_rho``; std = log1p(exp(rho))
(``TrainableRandomDistribution.sample``). The samplers register the same tensors again as
``weight_sampler.mu``/``.rho`` plus an ``eps_w`` buffer: aliases, skipped.
"""

from .checkpoint import paired_gaussians, state_dict_arrays

PAIRS = (("weight_mu", "weight_rho", "weight"), ("bias_mu", "bias_rho", "bias"))
EXPECTED = "<layer>.weight_mu/weight_rho, bias_mu/bias_rho"


def extract(obj, label):
    arrays = {key: value for key, value in state_dict_arrays(obj, label).items() if "_sampler." not in key}
    return paired_gaussians(arrays, PAIRS, "softplus")
