# -*- test-case-name: runai.test.test_modes -*-
"""Client images in the worker: decoded, resized, masked and composited.

They were checked on arrival (:mod:`runai.core.images`): only PNG, JPEG and WebP, the
pixel count read from the header and capped before a single pixel is decoded, then
decoded whole the way :func:`runai.core.images.decode` decodes them here again.
"""

from PIL import Image

from runai.core import errors
from runai.core.images import decode


def prepare(encoded_pixels, encoded_mask, width, height, need_mask):
    """The init image (RGB) and mask (L, white = repaint) at ``width`` x ``height``.

    Transparent pixels are always repainted: for outpainting the client sends the canvas
    with its empty part transparent. A given mask is combined with the transparency; a
    mask of another size is stretched to the image's.
    """
    rgba = decode(encoded_pixels, "pixels")
    if rgba.size != (width, height):
        rgba = rgba.resize((width, height), Image.LANCZOS)
    alpha = rgba.getchannel("A")
    # Repaint wherever the canvas is not fully opaque.
    mask = alpha.point(lambda a: 255 if a < 255 else 0)
    if encoded_mask is not None:
        given = decode(encoded_mask, "mask")
        # A mask's transparent parts mean "keep", whatever their colour.
        given = Image.composite(given.convert("L"), Image.new("L", given.size, 0), given.getchannel("A"))
        if given.size != (width, height):
            given = given.resize((width, height), Image.NEAREST)
        mask = Image.fromarray(_max(mask, given))
    rgb = _fill_transparent(rgba)
    if need_mask and mask.getextrema() == (0, 0):
        raise errors.RunaiError(errors.BAD_REQUEST, "the mask is empty: nothing to repaint")
    return rgb, mask


def _max(a, b):
    import numpy

    return numpy.maximum(numpy.asarray(a), numpy.asarray(b))


def _fill_transparent(rgba):
    """RGB, with transparent pixels set to the mean colour of the opaque ones.

    Black would pull the repainted region towards black; the mean colour is neutral.
    """
    import numpy

    pixels = numpy.asarray(rgba).astype(numpy.float32)
    alpha = pixels[..., 3:4] / 255.0
    weight = alpha.sum()
    mean = (pixels[..., :3] * alpha).sum(axis=(0, 1)) / weight if weight else numpy.full(3, 127.0)
    rgb = pixels[..., :3] * alpha + mean * (1.0 - alpha)
    return Image.fromarray(numpy.clip(rgb + 0.5, 0, 255).astype(numpy.uint8), "RGB")


def paste_unmasked(generated, original, mask):
    """The generated image where the mask is white, the client's pixels elsewhere.

    The VAE cannot reproduce an image exactly; without this, every inpaint would blur
    the parts of the picture that the user did not ask to change.
    """
    if generated.size != original.size:
        return generated
    return Image.composite(generated, original, mask)
