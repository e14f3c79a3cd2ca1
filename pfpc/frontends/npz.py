"""Reading a posterior .npz safely: no pickled objects, one-line errors naming the file and key.
Shared by the ordinary and the shared-posterior formats (`posterior`, `shared_posterior`)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import PfpcError


def _check_members(path, allowed=None, max_bytes=None) -> None:
    """Refuse, before anything is decompressed, duplicate member names, members that
    ``allowed(key)`` rejects (returns a reason) and members whose declared size exceeds
    ``max_bytes(key)`` (a small .npz can claim gigabytes)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: np.load says what it is
    seen = set()
    for info in infos:
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if key in seen:
            raise PfpcError(f"{path}: the archive holds two members named '{key}'; refusing an ambiguous posterior")
        seen.add(key)
        reason = allowed(key) if allowed is not None else None
        if reason:
            raise PfpcError(f"{path}: key '{key}' {reason}")
        limit = max_bytes(key) if max_bytes is not None else None
        if limit is not None and info.file_size > limit:
            raise PfpcError(f"{path}: member '{key}' would decompress to {info.file_size:,} bytes, more than the "
                            f"{limit:,} its tensor can need; refusing to read it")


def read_npz(path, allowed=None, max_bytes=None) -> dict:
    """The arrays of an .npz, read without pickles; ``allowed``/``max_bytes`` check every member
    by name and declared size before it is decompressed (`_check_members`)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        _check_members(path, allowed, max_bytes)
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
