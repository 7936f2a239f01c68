# -*- test-case-name: runai.test.test_modes -*-
"""Client-supplied images, checked on arrival: header first, then every pixel.

Images are the most dangerous input a client sends (decompression bombs, decoder bugs in
rarer formats), so: the base64 text is bounded before it is decoded, only PNG, JPEG and
WebP are opened, and the pixel count is read from the header and capped far below
Pillow's own limit before a single pixel is decoded. Then the image is decoded whole, as
the worker will decode it (:func:`decode`), and dropped: a truncated or corrupt image is
refused at once, naming its option, rather than after waiting in the queue; and only its
encoded bytes wait there. Decoding takes tenths of a second for a large image: doors call
this off the reactor thread. The worker decodes it again (:mod:`runai.engine.images`).
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
    """Validate a base64 image from a request: its header, then every pixel decoded.

    Accepts an optional ``data:image/...;base64,`` prefix, as browsers produce. Raises
    RunaiError with a message that names ``what`` (``pixels`` or ``mask``). Not on the
    reactor thread: decoding a large image takes tenths of a second.
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
    with _open(data, what) as image:
        width, height = image.size
        fmt, mode = image.format, image.mode
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
        # Every pixel, now, the worker's way; the result is not kept.
        _decoded(image, what)
    return EncodedImage(data, fmt, width, height, mode)


def _open(data, what):
    """The image in ``data``, opened (its header read, no pixel decoded yet)."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"image {what!r} is too large")
    except Exception:
        # Pillow raises many types for hostile bytes; all of them mean "not an image we take".
        raise errors.RunaiError(errors.BAD_REQUEST, f"option {what!r} is not a PNG, JPEG or WebP image")


def _decoded(image, what):
    """``image`` (opened) decoded to RGBA, JPEG orientation applied."""
    try:
        image.load()
        # In place: one copy of the pixels less at a time.
        ImageOps.exif_transpose(image, in_place=True)
        return image.convert("RGBA")
    except MemoryError:
        raise
    except Exception as e:
        # A truncated file, a broken compressed stream, a text-chunk bomb (Pillow's own
        # bound on text chunks), bad EXIF: the client's bytes, not a server fault.
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise errors.RunaiError(errors.BAD_REQUEST, f"option {what!r} is a corrupt or truncated image: {reason}")


def decode(encoded, what):
    """The pixels of a checked :class:`EncodedImage` as RGBA, JPEG orientation applied:
    what the worker paints from. Raises RunaiError naming ``what``."""
    with _open(encoded.data, what) as image:
        if image.size != (encoded.width, encoded.height):
            raise errors.RunaiError(errors.BAD_REQUEST, f"image {what!r} changed size while decoding")
        return _decoded(image, what)
