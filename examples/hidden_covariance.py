"""Where the MLP examples' PFP loses logit variance: the covariance of the relu2 outputs.

    PYTHONPATH=. python3 examples/hidden_covariance.py examples/mlp   # or examples/holdout89/mlp

Monte Carlo (whole weight samples, float64 NumPy) on the first 16 images of three dirty-digits
sets. The PFP's variance of the last Gemm assumes its inputs h (the relu2 outputs) independent:
sum_j s2_j E[h_j^2] + mu_j^2 Var(h_j) + s2_b. Evaluated with MC's exact marginals of h, that
formula alone gives `indep/MC`; adding the dropped term sum_{j!=k} mu_oj mu_ok Cov(h_j, h_k)
gives `(indep + cov)/MC`. A ratio of 1 after adding it means the covariance explains the gap.
"""

import sys

import numpy as np
import onnx
from onnx import numpy_helper

from pfpc.evaluate.datasets import default_suite

SAMPLES = 2000
IMAGES = 16


def main(model_dir: str) -> None:
    model = onnx.load(f"{model_dir}/model.onnx")
    mean = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    std = {k[: -len(".std")]: v.astype(np.float64) for k, v in np.load(f"{model_dir}/post.npz").items()}
    rng = np.random.default_rng(0)
    sets = {s.name: s.x[:IMAGES].astype(np.float64) for s in default_suite()}
    for name in ("clean", "noisy", "uniform_noise"):
        w1, b1, w2, b2, w3, b3 = (mean[k] + std[k] * rng.standard_normal((SAMPLES,) + mean[k].shape)
                                  for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"))
        h1 = np.maximum(np.einsum("bi,soi->sbo", sets[name], w1) + b1[:, None], 0)
        h2 = np.maximum(np.einsum("sbi,soi->sbo", h1, w2) + b2[:, None], 0)
        mc_var = (np.einsum("sbi,soi->sbo", h2, w3) + b3[:, None]).var(0)
        m2, v2 = h2.mean(0), h2.var(0)
        mu3, s2_3 = mean["fc3.weight"], std["fc3.weight"] ** 2
        indep = (m2**2 + v2) @ s2_3.T + v2 @ (mu3**2).T + std["fc3.bias"] ** 2
        centred = h2 - m2
        cov = np.einsum("sbj,sbk->bjk", centred, centred) / SAMPLES
        off_diagonal = np.einsum("oj,bjk,ok->bo", mu3, cov, mu3) - v2 @ (mu3**2).T
        print(f"{name:14s} median indep/MC {np.median(indep / mc_var):.3f}"
              f"   median (indep + cov)/MC {np.median((indep + off_diagonal) / mc_var):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/mlp")
