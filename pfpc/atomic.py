"""The one way pfpc writes its outputs: whole or not at all.

A file or directory is built under a staging name beside its destination
(``.pfpc-<pid>-<random>``, same file system) and renamed into place only when complete, so an
error, a signal or a concurrent compile never leaves a half-written output. Directories written
here carry ``pfpc-manifest.json``; ``force`` replaces an existing directory only if it holds one
(pfpc never deletes a directory it did not write). A staging name left by a killed process
(SIGKILL gives no chance to clean up) is removed by the next write into the same parent once
its process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile

from .errors import PfpcError

STAGING_PREFIX = ".pfpc-"
MANIFEST = "pfpc-manifest.json"
_STAGING = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-")


def staging_prefix() -> str:
    """The prefix of this process's staging names: the pid tells a live writer from a dead one."""
    return f"{STAGING_PREFIX}{os.getpid()}-"


def remove_stale_staging(parent: str) -> None:
    """Remove staging files and directories in ``parent`` whose process no longer exists."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        match = _STAGING.match(name)
        if not match or _alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            _rmtree(path)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def check_replaceable(out_dir: str, force: bool, option: str = "-o") -> None:
    """Refuse, in one line, an output path pfpc must not replace."""
    if os.path.islink(out_dir):
        raise PfpcError(f"{out_dir}: the output path ({option}) is a symbolic link (to {os.readlink(out_dir)}); "
                        "give the directory itself")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise PfpcError(f"{out_dir}: the output path is a file, not a directory; refusing to replace it")
    if not os.path.exists(out_dir):
        return
    if not force:
        raise PfpcError(f"{out_dir}: output directory exists (use --force to replace it)")
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise PfpcError(f"{out_dir}: not a directory written by pfpc (no {MANIFEST}); --force replaces only pfpc's own "
                        "output directories, refusing to delete it")


def write_directory(out_dir: str, fill, *, force: bool = False, check=None, version: str = "") -> None:
    """Call ``fill(staging)`` then ``check(staging)``, add the manifest and rename the staging
    directory to ``out_dir`` (replacing pfpc's own directory there if ``force``). On any failure
    nothing is left: neither the staging directory nor parent directories created for it.
    Errors name ``out_dir``, never the staging directory."""
    out_dir = os.path.abspath(out_dir)
    check_replaceable(out_dir, force)
    parent = os.path.dirname(out_dir)
    created = _missing_parents(parent)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_staging(parent)
        staging = tempfile.mkdtemp(prefix=staging_prefix(), dir=parent)
    except OSError as err:
        _remove_empty(created)
        raise PfpcError(f"{out_dir}: cannot write the output directory: {err.strerror}") from None
    try:
        try:
            fill(staging)
            _write_manifest(staging, version)
        except OSError as err:
            raise PfpcError(f"{out_dir}: cannot write the output directory: {err.strerror}") from None
        if check is not None:
            try:
                check(staging)
            except PfpcError as err:
                raise PfpcError(str(err).replace(staging, out_dir)) from None
        with _locked(parent):  # concurrent compiles into one -o: one complete output wins
            check_replaceable(out_dir, force)
            old = None
            if os.path.exists(out_dir):
                old = tempfile.mkdtemp(prefix=staging_prefix(), dir=parent)
                os.rename(out_dir, os.path.join(old, "old"))
            os.rename(staging, out_dir)
        if old is not None:
            _rmtree(old)
    except BaseException:
        _rmtree(staging)
        _remove_empty(created)
        raise


def write_file(path, write, what: str) -> None:
    """Call ``write(stream)`` on a staging file beside ``path`` and rename it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        remove_stale_staging(directory)
        handle, staging = tempfile.mkstemp(prefix=staging_prefix(), dir=directory)
    except OSError as err:
        raise PfpcError(f"{path}: cannot write the {what}: {err.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(staging, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise PfpcError(f"{path}: cannot write the {what}: {err.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def is_pfpc_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def _write_manifest(directory: str, version: str) -> None:
    files = sorted(os.path.relpath(os.path.join(root, name), directory)
                   for root, _, names in os.walk(directory) for name in names)
    with open(os.path.join(directory, MANIFEST), "w") as handle:
        json.dump({"generator": "pfpc", "version": version, "files": files}, handle, indent=2)
        handle.write("\n")


@contextlib.contextmanager
def _locked(directory: str):
    """An exclusive flock on ``directory`` itself (nothing is created for the lock)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rmtree(path: str) -> None:
    """Remove ``path`` even where a read-only subdirectory would stop shutil.rmtree."""

    def make_writable_and_retry(function, target, _):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            function(target)

    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _missing_parents(parent: str) -> list:
    created, missing = [], parent
    while not os.path.isdir(missing) and not os.path.lexists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    return created


def _remove_empty(directories):
    for directory in directories:  # deepest first
        try:
            os.rmdir(directory)
        except OSError:
            return
