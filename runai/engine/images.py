"""Client-supplied images: checked cheaply on the reactor, decoded in the worker.

Images are the most dangerous input a client sends (decompression bombs, decoder bugs in
rarer formats), so: the base64 text is bounded before it is decoded, only PNG, JPEG and
WebP are opened, and the pixel count is read from the header and capped far below
Pillow's own limit before a single pixel is decoded.
"""

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from runai.core import errors

FORMATS = ("PNG", "JPEG", "WEBP")
# Far below Pillow's 89 Mpx bomb threshold: 4096 x 4096 is more than any SD model paints.
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 8192
MAX_BASE64_CHARS = 48 * 1024 * 1024
# Room for metadata (ICC profiles, EXIF) beyond the pixels themselves.
ALLOWED_EXTRA_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EncodedImage:
    """A client image whose header has been checked; its pixels are not decoded yet."""

    data: bytes
    format: str
    width: int
    height: int
    mode: str


def check_image(value, what, max_pixels=MAX_PIXELS, max_base64_chars=MAX_BASE64_CHARS):
    """Validate a base64 image from a request without decoding its pixels.

    Accepts an optional ``data:image/...;base64,`` prefix, as browsers produce. Raises
    RunaiError with a message that names ``what`` (``pixels`` or ``mask``).
    """
    if not isinstance(value, str) or not value:
        raise errors.RunaiError(errors.BAD_REQUEST, f"option {what!r} must be a base64-encoded image")
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    if len(value) > max_base64_chars:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"option {what!r} is longer than {max_base64_chars} characters")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise errors.RunaiError(errors.BAD_REQUEST, f"option {what!r} is not valid base64")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            fmt, mode = image.format, image.mode
    except Image.DecompressionBombError:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"image {what!r} is too large")
    except Exception:
        # Pillow raises many types for hostile bytes; all of them mean "not an image we take".
        raise errors.RunaiError(errors.BAD_REQUEST, f"option {what!r} is not a PNG, JPEG or WebP image")
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE or width * height > max_pixels:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"image {what!r} is {width}x{height}; at most {max_pixels} pixels and {MAX_SIDE} per side",
        )
    if len(data) > width * height * 4 + ALLOWED_EXTRA_BYTES:
        # More bytes than even an uncompressed RGBA picture of that size needs: the rest
        # would only sit in memory while the job waits.
        raise errors.RunaiError(
            errors.BAD_REQUEST, f"image {what!r} is {len(data)} bytes for {width}x{height} pixels: too many")
    return EncodedImage(data, fmt, width, height, mode)


def decode(encoded):
    """Decode the pixels (in the worker thread); JPEG orientation applied."""
    with Image.open(io.BytesIO(encoded.data), formats=FORMATS) as image:
        image.load()
        if (image.width, image.height) != (encoded.width, encoded.height):
            raise errors.RunaiError(errors.BAD_REQUEST, "the image changed size while decoding")
        image = ImageOps.exif_transpose(image)
        return image.convert("RGBA")


def prepare(encoded_pixels, encoded_mask, width, height, need_mask):
    """The init image (RGB) and mask (L, white = repaint) at ``width`` x ``height``.

    Transparent pixels are always repainted: for outpainting the client sends the canvas
    with its empty part transparent. A given mask is combined with the transparency; a
    mask of another size is stretched to the image's.
    """
    rgba = decode(encoded_pixels)
    if rgba.size != (width, height):
        rgba = rgba.resize((width, height), Image.LANCZOS)
    alpha = rgba.getchannel("A")
    # Repaint wherever the canvas is not fully opaque.
    mask = alpha.point(lambda a: 255 if a < 255 else 0)
    if encoded_mask is not None:
        given = decode(encoded_mask)
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
