# -*- test-case-name: runai.test.test_engine,runai.test.test_legacy_parse -*-
"""Scheduler names a client may ask for, mapped to diffusers classes.

Torch-free on purpose: requests are validated without importing diffusers; the worker
turns the entry into a scheduler with :func:`runai.engine.schedulers.make_scheduler`.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    # Overrides applied on top of the model's own scheduler config.
    config: dict = field(default_factory=dict)


SCHEDULERS = {
    # The legacy clients' names.
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    # PLMS is diffusers' PNDM without its Runge-Kutta warm-up, as in the original LDM code.
    "plms": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm": SchedulerSpec("DPMSolverMultistepScheduler"),
    # Names users of other tools expect.
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # diffusers' documented stand-in for DPM++ SDE (the exact one, DPMSolverSDEScheduler,
    # needs torchsde). lower_order_final: with its default final_sigmas_type "zero" the
    # scheduler forces it on anyway, warning on every request.
    "dpmpp_sde": SchedulerSpec("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler"),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "dpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "lms_karras": SchedulerSpec("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}

DEFAULT_SCHEDULER = "euler_a"
