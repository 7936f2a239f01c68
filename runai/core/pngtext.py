# -*- test-case-name: runai.test.test_cli_history,runai.test.test_http -*-
"""Text in PNG files: the ``parameters`` chunk that AUTOMATIC1111 writes and that Stable
Diffusion tools read back, added without touching the image data."""

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_text(png, texts):
    """``png`` with an iTXt chunk (UTF-8, uncompressed) per ``texts`` entry after its
    IHDR; the image data is left byte for byte as it was."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    end_of_ihdr = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    chunks = b"".join(
        _chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00" + b"\x00" + b"\x00" + value.encode("utf-8"))
        for key, value in texts.items()
    )
    return png[:end_of_ihdr] + chunks + png[end_of_ihdr:]


def parameters_text(prompt, negative_prompt, fields):
    """The ``parameters`` text: the prompt, ``Negative prompt: ...`` when there is one, then
    ``Name: value`` pairs on one line (``fields``: pairs; those whose value is None left out)."""
    text = prompt or ""
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return text + "\n" + ", ".join(f"{name}: {value}" for name, value in fields if value is not None)
