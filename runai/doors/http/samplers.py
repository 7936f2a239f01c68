# -*- test-case-name: runai.test.test_http_parse -*-
"""AUTOMATIC1111's sampler and schedule names, mapped to runai's schedulers.

Since AUTOMATIC1111 1.9 the noise schedule is a field of its own (``scheduler``:
``automatic``, ``karras``, ...); older clients put it in the sampler's name
(``DPM++ 2M Karras``). runai's own names (``euler_a``) are taken too.
"""

from runai.core import errors
from runai.core.schedulers import SCHEDULERS
from runai.doors.jsonobject import quoted

# AUTOMATIC1111 name -> (runai scheduler, runai scheduler with the Karras schedule or None)
SAMPLERS = {
    "Euler a": ("euler_a", None),
    "Euler": ("euler", None),
    "LMS": ("lms", "lms_karras"),
    "Heun": ("heun", None),
    "DPM2": ("dpm2", None),
    "DPM2 a": ("dpm2_a", None),
    "DPM++ 2M": ("dpmpp_2m", "dpmpp_2m_karras"),
    "DPM++ SDE": ("dpmpp_sde", None),
    "DDIM": ("ddim", None),
    "PLMS": ("plms", None),
    "UniPC": ("unipc", None),
    "DDPM": ("ddpm", None),
}
ALIASES = {
    "k_euler_a": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun", "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a", "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE",
}
# Schedules: "automatic" is each sampler's own.
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
DEFAULT_SAMPLER = "Euler a"


def _by_name():
    names = {name.lower(): name for name in SAMPLERS}
    names.update((alias.lower(), name) for alias, name in ALIASES.items())
    return names


_NAMES = _by_name()


def scheduler_for(sampler, schedule=None):
    """runai's scheduler name for AUTOMATIC1111's ``sampler_name`` and ``scheduler``;
    raises RunaiError(unknown_scheduler) naming the field."""
    sampler = (sampler or DEFAULT_SAMPLER).strip()
    schedule = (schedule or "automatic").strip().lower()
    if sampler in SCHEDULERS:
        return sampler  # runai's own name
    lowered = sampler.lower()
    if lowered.endswith(" karras"):
        lowered, schedule = lowered[: -len(" karras")], "karras"
    name = _NAMES.get(lowered)
    if name is None:
        raise errors.RunaiError(
            errors.UNKNOWN_SCHEDULER,
            f"unknown sampler_name {quoted(sampler)}; known: {', '.join(SAMPLERS)}",
        )
    plain, karras = SAMPLERS[name]
    if schedule in ("automatic", "uniform", ""):
        return plain
    if schedule == "karras" and karras is not None:
        return karras
    raise errors.RunaiError(
        errors.UNKNOWN_SCHEDULER,
        f"scheduler {quoted(schedule)} is not available with {name}; "
        f"{'automatic or karras' if karras else 'automatic'} is",
    )


def names_of(scheduler):
    """``(sampler_name, schedule label)`` of a runai scheduler, as AUTOMATIC1111 shows them."""
    for name, (plain, karras) in SAMPLERS.items():
        if scheduler == plain:
            return name, "Automatic"
        if scheduler == karras:
            return name, "Karras"
    return scheduler, "Automatic"


def sampler_list():
    """``GET /sdapi/v1/samplers``."""
    return [{"name": name, "aliases": [k for k, v in ALIASES.items() if v == name], "options": {}}
            for name in SAMPLERS]


def schedule_list():
    """``GET /sdapi/v1/schedulers``."""
    return [{"name": key, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for key, label in SCHEDULES.items()]
