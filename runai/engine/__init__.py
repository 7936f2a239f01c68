"""The generation engine (worker thread only: torch and diffusers): a request in, PNG
images out, on the models :mod:`runai.models` loads.

:mod:`~runai.engine.engine` runs a request; :mod:`~runai.engine.device` picks the device
and precision; :mod:`~runai.engine.modes` (txt2img, img2img, inpaint, outpaint) with
:mod:`~runai.engine.images`; :mod:`~runai.engine.prompts` (long prompts);
:mod:`~runai.engine.schedulers`; :mod:`~runai.engine.safety` (the NSFW checker);
:mod:`~runai.engine.previews` (live previews: TAESD, or the family's linear map).
"""
