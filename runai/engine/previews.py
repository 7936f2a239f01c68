# -*- test-case-name: runai.test.test_taesd,runai.test.test_previews -*-
"""Live previews in the worker: the family's TAESD decoder where its weights are in the
model folder (a picture at full size), else the family's linear map (one pixel per latent).

One :class:`Previews` per engine, called from the worker thread only. A decoder is loaded
the first time a job of its family asks for a preview, on the engine's device, and kept;
replaced weights are loaded again, and weights that cannot be used are logged once and
the linear map takes over: a preview never fails a job.
"""

from twisted.logger import Logger

from runai.core import errors
from runai.models import taesd

log = Logger()

AUTO, CHEAP, TAESD = "auto", "cheap", "taesd"
DECODERS = (AUTO, CHEAP, TAESD)


class Previews:
    """Pictures of the latents as a pipeline holds them mid-job.

    ``model_dir``: the model folder (None: the linear map only); ``decoder``: ``auto``
    (TAESD where found), ``cheap`` (never looks) or ``taesd`` (the same as ``auto``, with a
    warning when a family's decoder is missing).
    """

    def __init__(self, model_dir, device, dtype, decoder=AUTO):
        if decoder not in DECODERS:
            raise ValueError(f"preview decoder must be one of {', '.join(DECODERS)}")
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.decoder = decoder
        # Decoder name -> (where it was found, its signature, the decoder or None when it
        # failed). Missing ones are looked for again at each preview (a few stats).
        self._loaded = {}
        self._missing_told = set()

    def forget(self):
        """Drop the loaded decoders (an unload): the next preview loads its decoder again."""
        self._loaded.clear()

    def picture(self, family, latents, height, width):
        """A PIL picture of the first image of ``latents`` (a request of ``width`` x
        ``height``): TAESD's at full size, or the family's linear map's."""
        decoder = self._decoder(family)
        if decoder is not None:
            try:
                return self._decode(decoder, family, latents, height, width)
            except Exception as e:  # noqa: BLE001 - a preview must never fail the job
                name = family.latent.taesd
                where, signature, _ = self._loaded[name]
                self._loaded[name] = (where, signature, None)
                log.warn("TAESD decoder {file} failed on {label} latents ({error}); previews use the linear map",
                         file=where.name, label=family.label, error=f"{type(e).__name__}: {str(e)[:200]}")
        return family.preview(latents, height, width)

    def _decoder(self, family):
        name = family.latent.taesd
        if self.decoder == CHEAP or not name or self.model_dir is None:
            return None
        try:
            found = taesd.find(self.model_dir, name)
        except errors.RunaiError as e:
            return self._refuse(name, None, None, family, e.message)
        if found is None:
            if self.decoder == TAESD and name not in self._missing_told:
                self._missing_told.add(name)
                log.warn("no {name} decoder in the model folder: previews of {label} models use the linear map",
                         name=name, label=family.label)
            self._loaded.pop(name, None)
            return None
        signature = found.signature()
        known = self._loaded.get(name)
        if known is not None and known[0] == found and known[1] == signature:
            return known[2]
        try:
            decoder, channels = taesd.load_decoder(self.model_dir, found, self.device, self.dtype)
        except errors.RunaiError as e:
            return self._refuse(name, found, signature, family, e.message)
        except Exception as e:  # noqa: BLE001 - weights that cannot be used are the linear map's turn
            return self._refuse(name, found, signature, family, f"{found.name}: {type(e).__name__}: {str(e)[:200]}")
        if channels != family.latent.channels:
            return self._refuse(name, found, signature, family,
                                f"{found.name} takes {channels} latent channels, {family.label} latents have "
                                f"{family.latent.channels}")
        self._loaded[name] = (found, signature, decoder)
        log.info("previews of {label} models by TAESD ({file})", label=family.label, file=found.name)
        return decoder

    def _refuse(self, name, found, signature, family, why):
        known = self._loaded.get(name)
        if known is None or known[0] != found or known[1] != signature:
            log.warn("TAESD decoder refused ({why}); previews of {label} models use the linear map",
                     why=why, label=family.label)
        self._loaded[name] = (found, signature, None)
        return None

    def _decode(self, decoder, family, latents, height, width):
        import numpy as np
        import torch
        from PIL import Image

        latent = family.unpack(latents[:1].detach(), height, width)
        with torch.inference_mode():
            rgb = decoder(latent.to(device=self.device, dtype=self.dtype))[0]  # -1..1
        pixels = ((rgb.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).movedim(0, -1).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
