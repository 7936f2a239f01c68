"""Where a client's model names may lead: inside the model folder, and nowhere else.

Every path is resolved (``..`` and symlinks) *before* it is checked for containment, so a
symlink inside the model folder that points outside it is refused like ``../..``.
"""

import os
from pathlib import Path

from runai.core import errors

MAX_NAME_LENGTH = 4096
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


# What a model name without an extension may stand for, best first: a diffusers folder
# loads fastest and needs nothing else; .safetensors needs no unpickling; .ckpt is last.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _model_at(resolved):
    """``"diffusers"`` or ``"file"`` if a model is at the resolved path, else None."""
    try:
        if resolved.is_dir():
            return "diffusers" if (resolved / "model_index.json").is_file() else None
        if resolved.is_file() and resolved.suffix.lower() in MODEL_FILE_SUFFIXES:
            return "file"
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
    if _model_at(resolved):
        return resolved, display
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
            if _model_at(found):
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
