# -*- test-case-name: runai.test.test_atomic -*-
"""Writing a new model all at once, or not at all, and never over anything.

:func:`write_then_rename` writes under a hidden temporary name beside the destination
(``.name.runai-1a2b3c4d.tmp``: the library skips hidden names) and renames it into place
when it is complete, so that an interrupted write never leaves half a model that the
library would list. Nothing that exists at the destination is ever replaced, not even
something that appears there while the model is being written.
"""

import errno
import os
import secrets
import shutil

from runai.models.errors import ConvertError


def _temporary_beside(dst):
    return dst.parent / f".{dst.name}.runai-{secrets.token_hex(4)}.tmp"


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _exists(shown):
    return ConvertError(f"{shown} already exists; move it away first (nothing is overwritten)")


def check_free(dst, shown):
    """Raise ConvertError if anything is at ``dst`` (``shown`` is how messages name it)."""
    if os.path.lexists(dst):
        raise _exists(shown)


def _move_into_place(temporary, dst, shown):
    """Rename ``temporary`` to ``dst`` unless ``dst`` exists, without the gap between a
    check and a rename in which something could appear at ``dst`` and be replaced."""
    if os.name == "nt":
        os.rename(temporary, dst)  # never replaces there: FileExistsError
        return
    if temporary.is_dir():
        # rename() replaces an empty directory: make dst ours first (mkdir fails if it
        # exists), then replace that empty placeholder. Whatever someone put into it in
        # between makes the rename fail with ENOTEMPTY rather than be replaced.
        try:
            os.mkdir(dst)
        except FileExistsError:
            raise _exists(shown)
        try:
            os.rename(temporary, dst)
        except OSError as e:
            try:
                os.rmdir(dst)  # only if still empty: then it is our placeholder
            except OSError:
                pass
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _exists(shown)
            raise
        return
    # A hard link is made only where nothing is: the file appears whole, or not at all.
    try:
        os.link(temporary, dst)
    except FileExistsError:
        raise _exists(shown)
    except OSError:
        # A file system without hard links: an exclusively created placeholder, then
        # replaced by the rename.
        try:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise _exists(shown)
        placeholder = os.fstat(fd).st_ino
        os.close(fd)
        try:
            os.rename(temporary, dst)
        except OSError:
            try:
                if os.stat(dst, follow_symlinks=False).st_ino == placeholder:
                    os.unlink(dst)
            except OSError:
                pass
            raise
        return
    try:
        os.unlink(temporary)
    except OSError:
        pass  # the model is in place; the caller removes what is left of the temporary


def write_then_rename(dst, shown, write):
    """``write(path)`` under a hidden name beside ``dst``, then rename it into place: a
    failed or cancelled write leaves nothing behind, and nothing is overwritten."""
    temporary = _temporary_beside(dst)
    try:
        write(temporary)
        check_free(dst, shown)
        _move_into_place(temporary, dst, shown)
    except OSError as e:
        raise ConvertError(f"cannot write {shown}: {e.strerror or e}")
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)
