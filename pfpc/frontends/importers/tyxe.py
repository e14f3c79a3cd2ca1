"""TyXe: variational BNNs built on Pyro (``tyxe.VariationalBNN``).

TyXe turns the network's parameters into Pyro sample sites named ``net.<module path>`` and fits
them with its own ``tyxe.guides.AutoNormal``, whose params ``<guide>.<site>.loc`` / ``.scale`` carry
a ``positive`` constraint (scale = exp(u)); the param store records it and the Pyro importer
applies it. Accepts the BNN object (its ``net_guide``), the guide, or a saved param store.
"""

from . import pyro_ppl

EXPECTED = "a TyXe BNN, its guide, or its param store (<guide>.net.<module>.weight.loc/.scale)"


def extract(obj, label):
    guide = getattr(obj, "net_guide", None)
    return pyro_ppl.extract(guide if guide is not None else obj, label)
