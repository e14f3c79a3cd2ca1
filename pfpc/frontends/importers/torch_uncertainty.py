"""torch-uncertainty: BayesLinear, BayesConv1d/2d/3d (``torch_uncertainty.layers.bayesian``).

Layers store ``weight_mu``/``weight_sigma`` and ``bias_mu``/``bias_sigma``, where the "sigma" is an
unconstrained rho: std = log1p(exp(weight_sigma)) (``TrainableDistribution.sample``). The samplers
register the same tensors again as ``weight_sampler.mu``/``.rho`` (aliases) and the priors have
``*_prior_dist.*`` buffers: skipped.
"""

from .checkpoint import paired_gaussians, state_dict_arrays

PAIRS = (("weight_mu", "weight_sigma", "weight"), ("bias_mu", "bias_sigma", "bias"))
EXPECTED = "<layer>.weight_mu/weight_sigma, bias_mu/bias_sigma"


def extract(obj, label):
    arrays = {key: value for key, value in state_dict_arrays(obj, label).items()
              if "_sampler." not in key and "_prior_dist." not in key}
    return paired_gaussians(arrays, PAIRS, "softplus")
