# -*- test-case-name: runai.test.test_engine,runai.test.test_modes -*-
"""Schedulers by name, built from a model's own scheduler config (imports diffusers)."""

from runai.families import sd


def make_scheduler(name, base_config):
    """Build the scheduler ``name`` (one of :data:`runai.core.schedulers.SCHEDULERS`) from
    a diffusion model's scheduler config; each family builds its own with
    :meth:`runai.families.base.Family.make_scheduler`."""
    return sd.FAMILY.make_scheduler(name, base_config)
