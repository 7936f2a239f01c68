"""Tiny random-weight upscalers in the layouts spandrel detects, for tests: ESRGAN (the old
``model.N`` RRDBNet layout, 8 filters, 1 block, x2) and Real-ESRGAN's compact SRVGGNet
(8 features, 2 convolutions, x4). Nothing is downloaded."""

import atexit
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

_models = None


def esrgan_state(scale=2, seed=0):
    """An RRDBNet state dict (``model.0.weight``, ``model.1.sub.0.RDB1.conv1.0.weight``...)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def compact_state(scale=4, seed=1):
    """An SRVGGNetCompact state dict (``body.0.weight``, ``body.1.weight`` (PReLU)...)."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_upscalers(folder):
    """``ESRGAN/2x-Tiny.safetensors``, ``ESRGAN/2x-TinyPickle.pth`` (its weights under
    ``params_ema``, as Real-ESRGAN saves them) and ``RealESRGAN/4x-Compact.pth`` (under
    ``params``) in ``folder``."""
    os.makedirs(os.path.join(folder, "ESRGAN"), exist_ok=True)
    os.makedirs(os.path.join(folder, "RealESRGAN"), exist_ok=True)
    save_file(esrgan_state(), os.path.join(folder, "ESRGAN", "2x-Tiny.safetensors"))
    torch.save({"params_ema": esrgan_state(seed=3)}, os.path.join(folder, "ESRGAN", "2x-TinyPickle.pth"))
    torch.save({"params": compact_state()}, os.path.join(folder, "RealESRGAN", "4x-Compact.pth"))


def upscaler_model_dir():
    """One model folder for the test run: v1/tiny (a tiny SD 1.x) and the tiny upscalers."""
    global _models
    if _models is None:
        from runai.test.tiny import build_tiny_pipeline

        _models = os.path.realpath(tempfile.mkdtemp(prefix="runai-upscalers-"))
        atexit.register(shutil.rmtree, _models, True)
        build_tiny_pipeline(os.path.join(_models, "v1", "tiny"))
        write_upscalers(_models)
    return _models
