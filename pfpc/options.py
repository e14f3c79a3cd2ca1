"""Checks of compile options that need no model: each failure is one line naming the CLI option."""

from __future__ import annotations

import re

import numpy as np

from .errors import PfpcError

MODES = ("pfp", "svi")
SVI_DEFAULT_SAMPLES = 100


def check_c_name(name) -> None:
    """The library prefix (``--name``) becomes file names, C identifiers and macros: an ASCII C
    identifier that is not a keyword."""
    from .c_identifiers import C_KEYWORDS

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name) or name in C_KEYWORDS:
        raise PfpcError(f"--name {name!r}: the library prefix must be a C identifier (letters, digits, _; "
                        "not starting with a digit; at most 63 characters) and not a C keyword")


def check_sampling_options(mode, samples, seed) -> tuple:
    """(samples, seed) for ``mode``, defaults filled in; one-line errors name the CLI options too."""
    if mode not in MODES:
        raise PfpcError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if mode != "svi":
        if samples is not None or seed is not None:
            raise PfpcError("samples (--samples) and seed (--seed) need mode svi (--mode svi)")
        return None, None
    samples = SVI_DEFAULT_SAMPLES if samples is None else samples
    seed = 0 if seed is None else seed
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise PfpcError(f"samples (--samples) must be an integer of at least 2 (the variance divides by samples - 1), not {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise PfpcError(f"seed (--seed) must be an integer in [0, 2**32), not {seed!r}")
    return int(samples), int(seed)


def check_outputs(outputs, mode) -> tuple:
    """The predictive outputs (``--outputs``) as a tuple; they need the PFP's logit moments."""
    outputs = tuple(outputs or ())
    if outputs and mode == "svi":
        raise PfpcError("--outputs: predictive outputs are computed from the PFP's logit moments; not available with --mode svi")
    return outputs


UNITS = {"": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2}


def parse_bytes(text: str, option: str) -> int:
    """'256K', '1M', '65536' -> bytes; a clear error names the option otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]i?[bB]?)?\s*", str(text))
    if not match:
        raise PfpcError(f"{option}: '{text}' is not a size (examples: 65536, 256K, 1M)")
    return int(match.group(1)) * UNITS[(match.group(2) or "").lower()]
