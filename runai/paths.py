"""Where a client's model names may lead: inside the model folder, and nowhere else.

Every path is resolved (``..`` and symlinks) *before* it is checked for containment, so a
symlink inside the model folder that points outside it is refused like ``../..``.
"""

import os
from pathlib import Path

from runai import errors

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


def resolve_model(model_dir, name, base_path=None):
    """Map a client's model name to a diffusers model folder inside ``model_dir``.

    ``name`` is relative to ``base_path`` (default: the model folder) or absolute.
    Returns ``(resolved_path, display_name)`` where the display name is relative to the
    model folder. Raises :class:`runai.errors.RunaiError`.
    """
    _check_name(name, "model")
    base = resolve_base_path(model_dir, base_path)
    resolved = contained(model_dir, base / name)
    if resolved is None:
        raise errors.RunaiError(
            errors.PATH_OUTSIDE_MODEL_DIR,
            f"model {name!r} is outside the server's model folder",
        )
    display = resolved.relative_to(model_dir).as_posix()
    try:
        exists = resolved.exists()
        is_model = exists and (resolved / "model_index.json").is_file()
    except OSError:
        # A name too long for the file system (ENAMETOOLONG), a permission error: such a
        # path cannot be a model, and must not escape as an exception other than RunaiError.
        exists = is_model = False
    if not exists:
        raise errors.RunaiError(errors.MODEL_NOT_FOUND, f"no model {display!r} in the model folder")
    if not is_model:
        raise errors.RunaiError(
            errors.MODEL_NOT_FOUND,
            f"{display!r} is not a diffusers model folder (it has no model_index.json); "
            "single-file .safetensors/.ckpt models are not served yet",
        )
    return resolved, display


def safety_checker_path(model_dir):
    """The safety checker's folder if it is installed in the model folder, else None."""
    resolved = contained(model_dir, model_dir / SAFETY_CHECKER)
    if resolved is None or not (resolved / "config.json").is_file():
        return None
    return str(resolved)
