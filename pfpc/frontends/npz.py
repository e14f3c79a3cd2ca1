"""Reading a posterior .npz safely: no pickled objects, one-line errors naming the file and key.
Shared by the ordinary and the shared-posterior formats (`posterior`, `shared_posterior`)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import PfpcError


def read_npz(path) -> dict:
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PfpcError(f"{path}: no such posterior file") from None
    except Exception as err:  # a damaged file fails anywhere in numpy's and zipfile's readers
        raise PfpcError(f"{path}: not a readable .npz posterior ({type(err).__name__}: {err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PfpcError(f"{path}: not an .npz archive (a single array was found)")
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as err:
                if "allow_pickle" not in str(err):
                    raise PfpcError(f"{path}: array '{key}' cannot be read ({err})") from None
                raise PfpcError(f"{path}: array '{key}' holds Python objects (pickled); refusing to load it") from None
            except Exception as err:
                raise PfpcError(f"{path}: array '{key}' cannot be read ({type(err).__name__}: {err})") from None
    return arrays
