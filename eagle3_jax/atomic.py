"""Writing outputs all at once, or not at all, and never at a user's expense.

Every directory or file eagle3-jax writes (a converted checkpoint, an
exported head, an evaluation report, a regenerated data set) is built in a
hidden temporary sibling and renamed into place when it is complete. The
rules, which every writer shares through this module:

* Nothing this process did not create is ever deleted. A temporary sibling
  is removed when its block fails; the destination is only ever *replaced*
  (with ``overwrite=True``) when it carries the marker of an eagle3-jax output
  of the same kind (``replaceable(path)``: e.g. ``eagle3_jax.json`` of a converted
  checkpoint), checked again at the moment of the swap.
* Without ``overwrite`` the final rename fails cleanly if the destination
  appeared meanwhile (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a check
  right before the rename).
* A temporary sibling is named ``.NAME.partial-XXXX`` and holds a lock file
  that its process keeps locked (``flock``) while it works. A process killed
  with ``kill -9`` leaves it behind; the next writer of the same destination
  removes such a directory only when its lock file is there and unlocked, so a
  partial output of a live process, or a directory of someone else's that
  happens to match the name, is never touched.
* :func:`check_destination` runs the same checks before any expensive work,
  so a command fails in seconds, not after hours, when its output can not be
  written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

from eagle3_jax.errors import CheckpointError

LOCK_NAME = ".eagle3_jax.partial.lock"
_PARTIAL = ".{name}.partial-"
_OLD = ".{name}.replaced-"

Owned = Callable[[str], bool]


def _never(path: str) -> bool:
    return False


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_usual_modes(path: str, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; an output gets what a plain mkdir/open would give (0777/0666 & ~umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _as_path(dst, what: str = "output path") -> str:
    if isinstance(dst, bytes) or not isinstance(dst, (str, os.PathLike)):
        raise CheckpointError(f"the {what} must be a str or os.PathLike, got {type(dst).__name__} {dst!r:.60}")
    dst = os.fspath(dst)
    if not isinstance(dst, str) or not dst:
        raise CheckpointError(f"the {what} must be a non-empty path, got {dst!r:.60}")
    return os.path.abspath(os.path.expanduser(dst))


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{name} must be True or False, got {value!r:.60}")
    return value


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _make_parents(parent: str) -> list[str]:
    """Creates ``parent`` and its missing ancestors; returns the ones created, outermost first."""
    created = []
    path = parent
    while not os.path.lexists(path):
        created.append(path)
        path = os.path.dirname(path)
    created.reverse()
    for path in created:
        os.mkdir(path)
    return created


def _remove_created(created: list[str]) -> None:
    """Removes the directories :func:`_make_parents` created, innermost first, if they are still empty."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(path)


# ----------------------------------------------------------------- renaming

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst``; raises FileExistsError if ``dst`` exists (a file, a link or a directory).

    Atomic on Linux (``renameat2`` with ``RENAME_NOREPLACE``); elsewhere, or on
    a file system without it, ``dst`` is checked right before a plain rename.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


# --------------------------------------------------------- partial outputs

def try_lock(path: str, *, create: bool = False) -> int | None:
    """A descriptor holding an exclusive ``flock`` on the file ``path``, or None if another process holds it.

    The lock lasts until the descriptor is closed or the process ends, however
    it ends. Without ``create`` a missing file is also None; with it, the file
    is created (mode 0644) if needed, and errors opening it are raised.
    """
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if create:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_stale_partials(dst: str) -> list[str]:
    """Removes the ``.NAME.partial-*`` siblings of ``dst`` left by killed eagle3-jax processes.

    Only a directory that holds an eagle3-jax lock file which no live process
    holds is removed. A previous output that was moved aside to be replaced
    (``.NAME.replaced-*``) goes back to ``dst`` if nothing took its place.
    Returns the removed paths.
    """
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    removed = []
    for pattern in (_PARTIAL, _OLD):
        for path in glob.glob(os.path.join(glob.escape(parent), glob.escape(pattern.format(name=name)) + "*")):
            if os.path.islink(path) or not os.path.isdir(path):
                continue
            fd = try_lock(os.path.join(path, LOCK_NAME))
            if fd is None:
                continue
            try:
                old = os.path.join(path, name)
                if pattern == _OLD and os.path.isdir(old) and not os.path.lexists(dst):
                    # killed between moving the old output aside and renaming the new one in: put it back
                    with contextlib.suppress(OSError):
                        rename_noreplace(old, dst)
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.exists(path):
                    removed.append(path)
            finally:
                os.close(fd)
    return removed


def _describe(path: str) -> str:
    if os.path.islink(path):
        return "a symbolic link"
    if os.path.isdir(path):
        return "a directory"
    return "a file"


def _is_ours(path: str, replaceable: Owned) -> bool:
    """A real directory (not a link) that carries the marker of an eagle3-jax output of this kind."""
    return not os.path.islink(path) and os.path.isdir(path) and replaceable(path)


def _is_empty_dir(path: str) -> bool:
    try:
        return not os.path.islink(path) and os.path.isdir(path) and not os.listdir(path)
    except OSError:
        return False


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False, replaceable: Owned = _never,
                      what: str = "output", empty_ok: bool = False) -> str:
    """Checks that ``dst`` can be written before any expensive work; returns its absolute path.

    Raises CheckpointError when ``dst`` exists and ``overwrite`` is off, when it
    exists but is not an eagle3-jax output of this kind (``replaceable``), or when its
    parent directory can not be created or written. With ``empty_ok`` an
    existing empty directory is a fine destination (there is nothing in it to lose).
    """
    dst = _as_path(dst)
    _check_flag("overwrite", overwrite)
    if empty_ok and _is_empty_dir(dst):
        pass
    elif os.path.lexists(dst):
        if not _is_ours(dst, replaceable):
            raise CheckpointError(f"{dst}: already exists and is not an output of eagle3-jax (it is {_describe(dst)}, "
                                  f"not an eagle3-jax {what}); refusing to replace it (choose another path, "
                                  "or move it away yourself)")
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    ancestor = _nearest_existing(os.path.dirname(dst))
    if not os.path.isdir(ancestor):
        raise CheckpointError(f"{dst}: can not write there: {ancestor} is {_describe(ancestor)}, not a directory")
    try:  # a probe where the first missing directory (or the output itself) will be created; nothing stays
        probe = tempfile.mkdtemp(prefix=_PARTIAL.format(name=os.path.basename(dst)) + "probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as e:
        raise CheckpointError(f"{dst}: can not write in {ancestor} ({e.strerror or e})") from None
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False, replaceable: Owned = _never,
                     what: str = "output", empty_ok: bool = False) -> Iterator[str]:
    """Yields a new temporary sibling directory that becomes ``dst`` when the block succeeds.

    Args:
      dst: the destination directory.
      overwrite: replace an existing ``dst``, which must then be a directory
        that ``replaceable`` recognises as an eagle3-jax output of this kind.
      replaceable: the marker check of this kind of output.
      what: the kind of output, for messages ("converted checkpoint", ...).
      empty_ok: an existing empty directory at ``dst`` is replaced as if it
        did not exist (it holds nothing to lose); if files appear in it
        meanwhile, the rename fails and they are kept.

    On any error, or if ``dst`` appears meanwhile without ``overwrite``, the
    temporary directory is removed and whatever is at ``dst`` is untouched.
    """
    dst = check_destination(dst, overwrite=overwrite, replaceable=replaceable, what=what, empty_ok=empty_ok)
    parent, name = os.path.split(dst)
    try:
        created = _make_parents(parent)
    except OSError as e:
        raise CheckpointError(f"{dst}: can not create {parent} ({e.strerror or e})") from None
    clean_stale_partials(dst)
    tmp = tempfile.mkdtemp(prefix=_PARTIAL.format(name=name), dir=parent)
    lock = os.path.join(tmp, LOCK_NAME)
    fd = try_lock(lock, create=True)  # a new file in a new directory: never held by anyone else
    try:
        yield tmp
        os.unlink(lock)  # the output must not carry it; a cleaner skips a directory without one
        _give_usual_modes(tmp, directory=True)
        _commit(tmp, dst, overwrite=overwrite, replaceable=replaceable, what=what, empty_ok=empty_ok)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    finally:
        os.close(fd)


def _commit(tmp: str, dst: str, *, overwrite: bool, replaceable: Owned, what: str, empty_ok: bool) -> None:
    """Moves the finished ``tmp`` to ``dst``, replacing only an owned directory (or an empty one if allowed)."""
    try:
        rename_noreplace(tmp, dst)
        return
    except FileExistsError:
        if empty_ok and _is_empty_dir(dst):
            try:
                os.rename(tmp, dst)  # replaces an empty directory atomically, fails if it is not empty
                return
            except OSError:
                pass
        if not overwrite:
            raise CheckpointError(f"{dst}: appeared while this output was being written; left it untouched and "
                                  "discarded this output (pass --overwrite to replace it)") from None
    # Replace: move the old output aside (only if it is ours), put the new one in place, then delete the old one.
    parent, name = os.path.split(dst)
    aside = tempfile.mkdtemp(prefix=_OLD.format(name=name), dir=parent)
    moved = os.path.join(aside, name)
    if not _is_ours(dst, replaceable):
        os.rmdir(aside)
        raise CheckpointError(f"{dst}: appeared while this output was being written and is not an output of "
                              f"eagle3-jax (it is {_describe(dst)}, not an eagle3-jax {what}); left it untouched "
                              "and discarded this output")
    lock_fd = try_lock(os.path.join(aside, LOCK_NAME), create=True)
    try:
        os.rename(dst, moved)
        if not _is_ours(moved, replaceable):  # swapped in a race: put it back
            rename_noreplace(moved, dst)
            raise CheckpointError(f"{dst}: changed while being replaced; left it untouched and discarded this output")
        _carry_over(moved, tmp)
        try:
            rename_noreplace(tmp, dst)
        except FileExistsError:
            raise CheckpointError(f"{dst}: appeared again while being replaced by another process; "
                                  f"the previous output is kept in {moved}") from None
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        os.close(lock_fd)


def _carry_over(old: str, new: str) -> None:
    """Moves the entries of the replaced output that the new one does not have (a README the user
    added, say) into the new one, so that replacing an output never deletes what a user put in it."""
    for entry in os.listdir(old):
        if entry != LOCK_NAME and not os.path.lexists(os.path.join(new, entry)):
            os.rename(os.path.join(old, entry), os.path.join(new, entry))


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary sibling path that becomes the file ``dst`` when the block succeeds.

    ``dst`` must not exist unless ``overwrite`` is on, and then it must be a
    regular file; a destination that appears meanwhile is never replaced
    without ``overwrite``.
    """
    dst = _as_path(dst)
    _check_flag("overwrite", overwrite)
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
        if os.path.islink(dst) or not os.path.isfile(dst):
            raise CheckpointError(f"{dst}: exists and is {_describe(dst)}, not a file; refusing to replace it")
    parent, name = os.path.split(dst)
    ancestor = _nearest_existing(parent)
    if not os.path.isdir(ancestor):
        raise CheckpointError(f"{dst}: can not write there: {ancestor} is {_describe(ancestor)}, not a directory")
    created: list[str] = []
    try:
        created = _make_parents(parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", dir=parent)
    except OSError as e:
        _remove_created(created)
        raise CheckpointError(f"{dst}: can not write in {parent} ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield tmp
        _give_usual_modes(tmp, directory=False)
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                rename_noreplace(tmp, dst)
            except FileExistsError:
                raise CheckpointError(f"{dst}: appeared while this output was being written; left it untouched "
                                      "and discarded this output") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_created(created)
        raise
