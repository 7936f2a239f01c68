# -*- test-case-name: runai.test.test_families,runai.test.test_flow_families -*-
"""What the flow-matching families (SD3, FLUX.1) share: their samplers and their base.

A flow model predicts a velocity along a straight path from noise to image, with sigmas
from 1 to 0 and a shift of the schedule toward the noisy end. diffusers' DDPM-style
samplers (Euler a, DDIM, PLMS, ...) cannot run it; the ones here can: flow Euler (the
models' own scheduler, the default), flow Heun, and DPM++ 2M and UniPC on flow sigmas
(where the pipeline lets them: FLUX's pipelines hand every scheduler custom sigmas, which
only some accept). Any other name is refused before the job waits in the queue.

Torch-free at import.
"""

from runai.core.schedulers import SchedulerSpec
from runai.families.base import Family

EULER = "euler"
# Scheduler name -> spec; the flow shift is the model's own (see make_scheduler).
FLOW_SCHEDULERS = {
    EULER: SchedulerSpec("FlowMatchEulerDiscreteScheduler"),
    "heun": SchedulerSpec("FlowMatchHeunDiscreteScheduler"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler",
                              {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler",
                           {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}


class FlowFamily(Family):
    """A flow-matching family: its samplers, refused names, T5 prompts as text."""

    schedulers = FLOW_SCHEDULERS
    size_multiple = 16  # 2x2 patches of an 8x latent
    single_files = False  # diffusers folders first; single files and companion files next

    def make_scheduler(self, name, base_config):
        """The scheduler ``name`` built on the model's flow-matching config: the flow
        scheduler's own from it, another from its shift."""
        import diffusers

        spec = self.schedulers[name]
        cls = getattr(diffusers, spec.class_name)
        base = dict(base_config)
        if spec.class_name.startswith("FlowMatch"):
            return cls.from_config(base, **spec.config)
        options = dict(spec.config, flow_shift=base.get("shift", 1.0))
        if base.get("use_dynamic_shifting"):
            options["use_dynamic_shifting"] = True
        return cls.from_config({}, num_train_timesteps=base.get("num_train_timesteps", 1000), **options)

    def denoiser(self, pipe):
        return pipe.transformer

    def auto_dtype(self, dtype, device):
        # float16 overflows in T5 (inf, then NaN images): bfloat16 has float32's range.
        import torch

        if device.type == "cuda" and dtype == torch.float16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return dtype

    def derive(self, pipe, cls):
        import inspect

        # Some mode pipelines take fewer components (FLUX.1 Fill has no image encoder).
        accepted = inspect.signature(cls.__init__).parameters
        derived = cls(**{k: v for k, v in pipe.components.items() if k in accepted})
        derived.set_progress_bar_config(disable=True)
        return derived
