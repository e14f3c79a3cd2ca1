"""Pyro: AutoNormal and AutoDiagonalNormal guides, from a saved param store or the guide itself.

A param store (``pyro.get_param_store().save(path)``, or ``get_state()``) holds every parameter
unconstrained together with its constraint. The std is the *constrained* value that Pyro itself
computes from the stored constraint (a fresh ``ParamStoreDict`` is given the state and asked for
its values): softplus for ``softplus_positive`` (AutoNormal's scales since Pyro 1.8), exp for
``positive`` (TyXe's guides), whatever the file says; nothing is guessed.

- AutoNormal: ``<guide>.locs.<site>`` / ``<guide>.scales.<site>``.
- TyXe-style guides: ``<guide>.<site>.loc`` / ``<guide>.<site>.scale``.
- AutoDiagonalNormal: one flat ``<guide>.loc`` / ``<guide>.scale`` over all sites; which part is
  which site lives in the guide (its prototype trace), not in the param store, so it is read from
  the guide object (the guide's own ``_unpack_latent``): pass the guide, not the file.

A guide object (AutoNormal, AutoDiagonalNormal or TyXe's AutoNormal) gives its posterior per site
directly; sites whose support is not the real line are not Gaussian weights and are skipped.
"""

from __future__ import annotations

import re

from ...errors import PfpcError
from .checkpoint import Gaussian, key_list, to_numpy

EXPECTED = "a Pyro param store with <guide>.locs.<site>/<guide>.scales.<site> or <guide>.<site>.loc/.scale"
AUTONORMAL = re.compile(r"^(?P<guide>.+?)\.locs\.(?P<site>.+)$")
PER_SITE = re.compile(r"^(?P<site>.+\..+)\.loc$")
FLAT = re.compile(r"^(?P<guide>[^.]+)\.loc$")


def extract(obj, label):
    if _is_guide(obj):
        return from_guide(obj, label)
    if hasattr(obj, "get_state") and callable(obj.get_state):
        obj = obj.get_state()
    if not (isinstance(obj, dict) and set(obj) == {"params", "constraints"}):
        keys = list(obj) if isinstance(obj, dict) else []
        raise PfpcError(f"{label}: not a Pyro param store (expected the dict of 'params' and 'constraints' that "
                        f"pyro.get_param_store().save() writes); found {key_list(keys)}")
    return from_param_store_state(obj, label)


def _is_guide(obj):
    return hasattr(obj, "prototype_trace") and callable(obj)


def from_param_store_state(state, label):
    from pyro.params.param_store import ParamStoreDict

    store = ParamStoreDict()
    store.set_state(state)
    names = list(store.keys())
    found = []
    for name in names:
        if (m := AUTONORMAL.match(name)) and f"{m['guide']}.scales.{m['site']}" in store:
            scale_name = f"{m['guide']}.scales.{m['site']}"
            site = m["site"]
        elif (m := PER_SITE.match(name)) and f"{m['site']}.scale" in store:
            scale_name = f"{m['site']}.scale"
            site = m["site"]
        elif (m := FLAT.match(name)) and f"{m['guide']}.scale" in store:
            raise PfpcError(f"{label}: '{name}' and '{m['guide']}.scale' are one flat vector over all sites "
                            f"(AutoDiagonalNormal); their site order and shapes are in the guide, not in the param store: "
                            f"import from Python with the guide object, pfpc.frontends.importers.import_posterior('pyro', guide, model)")
        elif (m := FLAT.match(name)) and f"{m['guide']}.scale_tril" in store:
            raise PfpcError(f"{label}: '{name}' belongs to a full-covariance guide ('{m['guide']}.scale_tril'); pfpc needs a mean-field (diagonal) posterior")
        else:
            continue
        constraint = state["constraints"][scale_name]
        found.append(Gaussian(site, to_numpy(store[name]), to_numpy(store[scale_name]),
                              f"{name}, {scale_name} (std = the param store's constrained value, {constraint})"))
    return found


def _real_support(site):
    from torch.distributions import constraints

    support = site["fn"].support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def from_guide(guide, label):
    """Per site of a fitted guide: loc and scale as the guide computes them (constrained)."""
    from pyro.infer.autoguide import AutoContinuous, AutoDiagonalNormal

    if guide.prototype_trace is None:
        raise PfpcError(f"{label}: the guide has not been run yet (train it, or call it once on an input)")
    sites = [site for _, site in guide.prototype_trace.iter_stochastic_nodes()]
    if isinstance(guide, AutoDiagonalNormal):
        locs = {site["name"]: value for site, value in guide._unpack_latent(guide.loc)}
        scales = {site["name"]: value for site, value in guide._unpack_latent(guide.scale)}
        def pair(name):
            return locs[name], scales[name]
        how = f"{type(guide).__name__}.loc/.scale unflattened in the guide's site order"
    elif isinstance(guide, AutoContinuous):
        raise PfpcError(f"{label}: {type(guide).__name__} is not a mean-field guide; pfpc needs AutoNormal or AutoDiagonalNormal")
    elif hasattr(guide, "_get_loc_and_scale"):
        pair, how = guide._get_loc_and_scale, f"{type(guide).__name__} loc/scale of the site"
    elif hasattr(guide, "get_loc") and hasattr(guide, "get_scale"):
        def pair(name):
            return guide.get_loc(name), guide.get_scale(name)
        how = f"{type(guide).__name__} get_loc/get_scale of the site"
    else:
        raise PfpcError(f"{label}: {type(guide).__name__} is not a guide pfpc reads (AutoNormal, AutoDiagonalNormal, TyXe's AutoNormal)")
    found = []
    for site in sites:
        if not _real_support(site):
            continue
        loc, scale = pair(site["name"])
        found.append(Gaussian(site["name"], to_numpy(loc), to_numpy(scale), f"site '{site['name']}': {how}"))
    return found
