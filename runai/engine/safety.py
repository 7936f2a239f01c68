# -*- test-case-name: runai.test.test_modes -*-
"""The NSFW safety checker, when its model is in the model folder. Worker thread only.

runai never downloads it: the user puts ``CompVis/stable-diffusion-safety-checker`` (its
``config.json``, weights and ``preprocessor_config.json``) in the model folder.
"""

from runai.models import offline  # before diffusers and transformers

import numpy
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor

from runai.core import errors
from runai.models import loadlock
from runai.models.paths import SAFETY_CHECKER as CHECKER_PATH

del offline  # imported for what importing it does


class SafetyChecker:
    def __init__(self, device, dtype):
        self.device = device
        self.dtype = dtype
        self.path = None
        self._checker = None
        self._extractor = None

    def _load(self, path):
        if self.path == path:
            return
        try:
            # Under the process's load lock (runai.models.loadlock): another worker may be
            # loading a model at the same time.
            with loadlock.loading():
                checker = StableDiffusionSafetyChecker.from_pretrained(path, local_files_only=True)
                extractor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise errors.RunaiError(
                errors.MODEL_LOAD_FAILED,
                f"the safety checker in {CHECKER_PATH} could not be loaded: {type(e).__name__}: {e}"[:500],
            )
        self._checker = checker.to(self.device, self.dtype).eval()
        self._extractor = extractor
        self.path = path

    def flags(self, path, pil_images):
        """One bool per image: True where the checker flags it."""
        import torch

        self._load(path)
        features = self._extractor(images=pil_images, return_tensors="pt").pixel_values
        arrays = [numpy.asarray(image, dtype=numpy.float32) / 255.0 for image in pil_images]
        with torch.inference_mode():
            _, flagged = self._checker(clip_input=features.to(self.device, self.dtype), images=arrays)
        return [bool(f) for f in flagged]
