# -*- test-case-name: runai.test.test_paths,runai.test.test_cache -*-
"""Where a client's model names may lead: inside the model folder, and nowhere else.

Every path is resolved (``..`` and symlinks) *before* it is checked for containment, so a
symlink inside the model folder that points outside it is refused like ``../..``. A
folder that is about to be opened is walked whole (:func:`check_tree`): one link in it to
elsewhere is enough to refuse it. :func:`model_format` says which format a path holds.

Torch-free: the reactor resolves requests with it.
"""

import json
import os
from pathlib import Path

from runai.core import errors
from runai.models import sources
from runai.models.errors import LoadError

MAX_NAME_LENGTH = 4096
# Bigger than any config a model folder holds.
MAX_JSON_BYTES = 1024 * 1024
# The NSFW checker's folder, relative to the model folder: the Hub name users know.
SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"


def _check_name(value, what):
    if not isinstance(value, str) or not value:
        raise errors.RunaiError(errors.BAD_REQUEST, f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in value:
        raise errors.RunaiError(errors.BAD_REQUEST, f"{what} contains a NUL character")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        # JSON can carry lone surrogates ("\ud800"), which no file name can hold; os
        # calls would raise UnicodeEncodeError instead of a RunaiError.
        raise errors.RunaiError(errors.BAD_REQUEST, f"{what} is not a valid file name")


def contained(model_dir, candidate):
    """Resolve ``candidate`` and return it if it lies in ``model_dir`` (itself resolved)."""
    resolved = Path(os.path.realpath(candidate))
    if resolved != model_dir and not resolved.is_relative_to(model_dir):
        return None
    return resolved


def resolve_base_path(model_dir, base_path):
    """The folder a relative model name is taken from: the model folder or one inside it."""
    if base_path is None:
        return model_dir
    _check_name(base_path, "model_base_path")
    # A relative base is taken from the model folder, never from the server's cwd.
    resolved = contained(model_dir, model_dir / base_path)
    if resolved is None:
        raise errors.RunaiError(
            errors.PATH_OUTSIDE_MODEL_DIR,
            "model_base_path must be the server's model folder or a folder inside it",
        )
    return resolved


DIFFUSERS = "diffusers"
SAFETENSORS = "safetensors"
CKPT = "ckpt"
FILE_FORMATS = {".safetensors": SAFETENSORS, ".ckpt": CKPT}
# What a model name without an extension may stand for, best first: a diffusers folder
# loads fastest and needs nothing else; .safetensors needs no unpickling; .ckpt is last.
MODEL_FILE_SUFFIXES = tuple(FILE_FORMATS)


def model_format(path):
    """``"diffusers"``, ``"safetensors"`` or ``"ckpt"`` for the model at the resolved
    ``path``; None where there is no model."""
    path = Path(path)
    try:
        if path.is_dir():
            return DIFFUSERS if (path / "model_index.json").is_file() else None
        if path.is_file():
            return FILE_FORMATS.get(path.suffix.lower())
    except OSError:
        # A name too long for the file system (ENAMETOOLONG), a permission error: such a
        # path cannot be a model, and must not escape as an exception other than RunaiError.
        pass
    return None


def resolve_model(model_dir, name, base_path=None):
    """Map a client's model name to a model inside ``model_dir``.

    A model is a diffusers folder (with a ``model_index.json``), a ``.safetensors`` file
    or a ``.ckpt`` file. A name with an extension is taken as it is; a name without one
    (``v1/mymodel``) resolves to the best format present: the folder, then
    ``mymodel.safetensors``, then ``mymodel.ckpt``. ``name`` is relative to ``base_path``
    (default: the model folder) or absolute. Every candidate is resolved, symlinks
    included, before it is checked for containment and before it is looked at.
    Returns ``(resolved_path, display_name)`` where the display name is relative to the
    model folder. Raises :class:`runai.core.errors.RunaiError`.
    """
    _check_name(name, "model")
    base = resolve_base_path(model_dir, base_path)
    literal = base / name
    resolved = contained(model_dir, literal)
    if resolved is None:
        raise errors.RunaiError(
            errors.PATH_OUTSIDE_MODEL_DIR,
            f"model {name!r} is outside the server's model folder",
        )
    display = resolved.relative_to(model_dir).as_posix()
    if model_format(resolved):
        return resolved, display
    if resolved == model_dir:
        # "." or "./": no name to add an extension to (".safetensors" beside the folder).
        raise errors.RunaiError(
            errors.MODEL_NOT_FOUND, f"model {name!r} is the model folder itself; name a model inside it")
    explicit = literal.suffix.lower() in MODEL_FILE_SUFFIXES
    if not explicit and literal.name:
        for suffix in MODEL_FILE_SUFFIXES:
            candidate = literal.with_name(literal.name + suffix)
            found = contained(model_dir, candidate)
            if found is None:
                # A link to elsewhere is refused, not skipped: the client should learn why
                # the file it sees is not served.
                raise errors.RunaiError(
                    errors.PATH_OUTSIDE_MODEL_DIR,
                    f"model {name + suffix!r} is outside the server's model folder",
                )
            if model_format(found):
                return found, found.relative_to(model_dir).as_posix()
    try:
        exists = resolved.exists()
    except OSError:
        exists = False
    if not exists:
        tried = "" if explicit else f" (looked for a diffusers folder, {display}.safetensors and {display}.ckpt)"
        raise errors.RunaiError(errors.MODEL_NOT_FOUND, f"no model {display!r} in the model folder{tried}")
    raise errors.RunaiError(
        errors.MODEL_NOT_FOUND,
        f"{display!r} is not a model: neither a diffusers folder (with a model_index.json) "
        "nor a .safetensors or .ckpt file",
    )


def read_json(model_dir, path):
    """The JSON object in the file ``path`` if it lies inside ``model_dir`` (resolved) and
    is small enough to be a config; None for anything else: a config that cannot be read
    is a config that is not there."""
    resolved = contained(model_dir, path)
    if resolved is None or not resolved.is_file():
        return None
    sources.note(resolved)  # a config a load reads: the cache reloads when it changes
    if resolved.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        value = json.loads(resolved.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def check_tree(model_dir, folder, limit=10_000):
    """Raise LoadError unless everything under ``folder`` resolves inside ``model_dir``.

    A diffusers folder is many files, and ``from_pretrained`` follows symlinks: one link
    to elsewhere in ``unet/`` would have it open a file outside the model folder.
    """
    model_dir = Path(os.path.realpath(model_dir))
    pending = [Path(folder)]
    seen = set()
    count = 0
    while pending:
        current = pending.pop()
        try:
            children = list(os.scandir(current))
        except OSError as e:
            raise LoadError(f"cannot read {current.name}: {e.strerror}")
        for child in children:
            count += 1
            if count > limit:
                raise LoadError(f"the model folder {Path(folder).name} has more than {limit} files")
            resolved = contained(model_dir, child.path)
            if resolved is None:
                shown = os.path.relpath(child.path, model_dir) if current != Path(folder) else child.name
                raise LoadError(f"{shown} is a link to a place outside the model folder")
            if resolved.is_dir() and resolved not in seen:
                seen.add(resolved)
                pending.append(resolved)


def safety_checker_path(model_dir):
    """The safety checker's folder if it is installed in the model folder, else None."""
    resolved = contained(model_dir, model_dir / SAFETY_CHECKER)
    try:
        if resolved is None or not (resolved / "config.json").is_file():
            return None
        # from_pretrained follows links: every file it may open must lie inside too.
        for entry in os.scandir(resolved):
            if contained(model_dir, entry.path) is None:
                raise errors.RunaiError(
                    errors.PATH_OUTSIDE_MODEL_DIR,
                    f"{SAFETY_CHECKER}/{entry.name} is a link to a place outside the model folder",
                )
    except OSError:
        return None
    return str(resolved)
