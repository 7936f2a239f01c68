# -*- test-case-name: runai.test.test_modes -*-
"""Client-supplied images, checked on arrival without decoding their pixels.

The worker decodes them later (:mod:`runai.engine.images`).

Images are the most dangerous input a client sends (decompression bombs, decoder bugs in
rarer formats), so: the base64 text is bounded before it is decoded, only PNG, JPEG and
WebP are opened, and the pixel count is read from the header and capped far below
Pillow's own limit before a single pixel is decoded.
"""

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

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
