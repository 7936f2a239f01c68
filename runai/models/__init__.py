"""The model library: what is in the model folder, and how a model becomes a pipeline.

Torch-free, for the reactor: :mod:`~runai.models.paths` (where a model name may lead, and
which format is there), :mod:`~runai.models.classify` (what a model is, from its
content), :mod:`~runai.models.library` (the listing, cached), :mod:`~runai.models.checkpoint`
and :mod:`~runai.models.pickle_walk` (reading checkpoint files without trusting them),
:mod:`~runai.models.errors`.

Worker thread only (torch and diffusers): :mod:`~runai.models.singlefile` (a pipeline from
one ``.safetensors``/``.ckpt``), :mod:`~runai.models.cache` (loading, and the LRU cache of
loaded pipelines), :mod:`~runai.models.convert` with :mod:`~runai.models.ldm_layout` and
:mod:`~runai.models.atomic` (single file <-> diffusers folder), :mod:`~runai.models.taesd`
(TAESD preview decoders in the model folder). :mod:`~runai.models.offline`
keeps the Hub away from all of them.
"""
