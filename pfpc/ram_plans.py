"""The compile plans a RAM limit (``--ram-limit``, ``pfpc.compile(ram_limit=...)``) chooses among.

A plan is (covariance, covariance budget, moment storage). `candidates` lists them from the plan
asked for down, in order of expected accuracy: every step down either stores the variances between
layers in bfloat16 (a relative error of at most 2^-9 per stored variance; ResNet-8's logit
variances move by 1.6e-4 relative, benchmarks/moment_storage.md) or carries the per-channel
covariance on fewer convolutions (a smaller ``--covariance-budget``: ResNet-8's median PFP/MC
output variance falls from 0.99 at the default to 0.91 at 0.1 and 0.42 without it,
benchmarks/ram_tradeoff.md). The storage costs far less accuracy than any step of covariance, so
at each covariance plan float32 comes before bfloat16; a plan never goes above what was asked
(an explicit ``--moment-storage bfloat16`` or ``--covariance none`` stays).
"""

from __future__ import annotations

#: Covariance budgets tried below the one asked for (fractions of the diagonal PFP's work).
LOWER_BUDGETS = (0.25, 0.2, 0.15, 0.1, 0.05)


def candidates(covariance: str, budget: float, moment_storage: str) -> list[tuple[str, float, str]]:
    """(covariance, budget, moment storage) from the plan asked for down to the smallest."""
    storages = ("float32", "bfloat16") if moment_storage == "float32" else (moment_storage,)
    if covariance == "auto":
        coverages = [("auto", budget)] + [("auto", lower) for lower in LOWER_BUDGETS if lower < budget] + [("none", budget)]
    else:
        coverages = [(covariance, budget)]
    return [(mode, fraction, storage) for mode, fraction in coverages for storage in storages]


def describe(plan: tuple[str, float, str]) -> str:
    """The command-line options that give ``plan``."""
    covariance, budget, storage = plan
    return (f"--covariance {covariance}" + (f" --covariance-budget {budget:g}" if covariance == "auto" else "")
            + f" --moment-storage {storage}")
