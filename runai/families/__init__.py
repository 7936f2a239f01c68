# -*- test-case-name: runai.test.test_families -*-
"""Model families, one module each: what the rest of runai asks instead of naming one.

Adding a family is one module here (a :class:`runai.families.base.Family` subclass and its
``FAMILY``), its place in :data:`FAMILIES`, its recognition rules in
:mod:`runai.models.classify`, and its tests. Torch-free at import (see
:mod:`runai.families.base`).
"""

import importlib
import pkgutil

# Every module of this package that defines a FAMILY, in name order: adding a family
# touches no other module.
FAMILIES = tuple(
    getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
    if not info.ispkg and hasattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY")
)

_BY_VERSION = {version: family for family in FAMILIES for version in family.versions}
_BY_PIPELINE = {name: family for family in FAMILIES for name in family.pipeline_classes}


def served_versions():
    """Every library version string a family serves."""
    return tuple(_BY_VERSION)


def served_pipelines():
    """Every diffusers pipeline class name a family serves from a folder."""
    return tuple(_BY_PIPELINE)


def for_version(version):
    """The family of the library's ``version`` string, or None."""
    return _BY_VERSION.get(version)


def for_pipeline(pipe):
    """The family of a loaded pipeline (by its class, or one of its bases)."""
    for cls in type(pipe).__mro__:
        family = _BY_PIPELINE.get(cls.__name__)
        if family is not None:
            return family
    raise LookupError(f"no family runs {type(pipe).__name__}")


def weight_folders():
    """Every component folder of a diffusers model that holds weights, in any family."""
    seen = []
    for family in FAMILIES:
        seen += [f for f in family.weight_folders if f not in seen]
    return tuple(seen)
