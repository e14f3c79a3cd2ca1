"""torchbnn (Harry24k/bayesian-neural-network-pytorch): BayesLinear, BayesConv2d.

Layers store ``weight_mu``/``weight_log_sigma`` and ``bias_mu``/``bias_log_sigma``; std =
exp(log_sigma) (``weight_mu + torch.exp(weight_log_sigma) * eps`` in their forward). The ``*_eps``
buffers of a frozen layer are not part of the posterior.
"""

from .checkpoint import paired_gaussians, state_dict_arrays

PAIRS = (("weight_mu", "weight_log_sigma", "weight"), ("bias_mu", "bias_log_sigma", "bias"))
EXPECTED = "<layer>.weight_mu/weight_log_sigma, bias_mu/bias_log_sigma"


def extract(obj, label):
    return paired_gaussians(state_dict_arrays(obj, label), PAIRS, "exp")
