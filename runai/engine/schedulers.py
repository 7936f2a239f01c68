# -*- test-case-name: runai.test.test_engine,runai.test.test_modes -*-
"""Schedulers by name, built from a model's own scheduler config (imports diffusers)."""

from runai.core.schedulers import SCHEDULERS


def make_scheduler(name, base_config):
    """Build the scheduler ``name`` from a model's scheduler config (imports diffusers)."""
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(dict(base_config), **spec.config)
