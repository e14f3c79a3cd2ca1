"""bayesian-torch (Intel Labs): Reparameterization and Flipout layers.

Linear layers store ``mu_weight``/``rho_weight``, convolutions ``mu_kernel``/``rho_kernel``, both
``mu_bias``/``rho_bias``; std = log1p(exp(rho)) (``sigma_weight = torch.log1p(torch.exp(self.rho_weight))``
in the layers' forward). The ``eps_*`` buffers (the last noise drawn) and ``prior_*`` buffers are not
part of the posterior. Layouts are PyTorch's (``[out, in]``, ``[out, in/groups, kh, kw]``).
"""

from .checkpoint import paired_gaussians, state_dict_arrays

PAIRS = (("mu_weight", "rho_weight", "weight"), ("mu_kernel", "rho_kernel", "weight"), ("mu_bias", "rho_bias", "bias"))
EXPECTED = "<layer>.mu_weight/rho_weight, mu_kernel/rho_kernel, mu_bias/rho_bias"


def extract(obj, label):
    return paired_gaussians(state_dict_arrays(obj, label), PAIRS, "softplus", ignore=("eps_", "prior_"))
