# -*- test-case-name: runai.test.test_openai_parts -*-
"""``multipart/form-data`` bodies, bounded, in memory: bytes in, fields and files out.

The body is already whole in memory and within the site's limit (twisted.web's own
form parsing is off: it would go through ``cgi`` and may write a temporary file). Parts
are found with ``bytes.find`` (one pass over the body, so hostile input stays linear),
each part's headers are read with the standard library's ``email`` header parser, and
what a client may send is bounded: the number of parts, the size of a part's headers,
and the size of a text field. Nothing is written anywhere; a malformed body is a
``bad_request`` naming what is wrong.
"""

import email.message
import email.parser
import email.utils
from dataclasses import dataclass, field

from runai.core import errors

MAX_PARTS = 64
MAX_HEADER_BYTES = 8 * 1024
# A text field: a prompt of 20,000 characters is at most 80 KB of UTF-8.
MAX_FIELD_BYTES = 256 * 1024
MAX_BOUNDARY_CHARS = 200


@dataclass(frozen=True)
class File:
    """One uploaded file: its bytes, as the client sent them."""

    name: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Form:
    """The parts of a body: text fields and files by field name, in the order sent."""

    fields: dict = field(default_factory=dict)  # name -> [str, ...]
    files: dict = field(default_factory=dict)  # name -> [File, ...]

    def field(self, name):
        """The one value of text field ``name``, or None; sent twice is a bad_request."""
        values = self.fields.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r} is given {len(values)} times")
        return values[0]


def _bad(message):
    return errors.RunaiError(errors.BAD_REQUEST, f"the multipart/form-data body is malformed: {message}")


def boundary_of(content_type):
    """The boundary of a ``multipart/form-data`` Content-Type, or RunaiError."""
    message = email.message.Message()
    message["content-type"] = content_type or ""
    if message.get_content_type() != "multipart/form-data":
        raise errors.RunaiError(errors.BAD_REQUEST, "this route takes a multipart/form-data body "
                                                    f"(an image file and form fields), not {content_type or 'nothing'}")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
        raise _bad("its Content-Type has no usable boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise _bad("its boundary is not ASCII")


def _headers(block):
    """``(name, filename or None, content type)`` from a part's header block."""
    headers = email.parser.BytesHeaderParser().parsebytes(block)
    if headers.get_content_disposition() != "form-data":
        raise _bad("a part is not form-data")
    name = headers.get_param("name", header="content-disposition")
    if isinstance(name, tuple):  # RFC 2231: (charset, language, value)
        name = email.utils.collapse_rfc2231_value(name)
    if not isinstance(name, str) or not name:
        raise _bad("a part has no name")
    filename = headers.get_filename()  # RFC 2231 (filename*=) too
    return name, filename, headers.get_content_type()


def parse(body, content_type, max_parts=MAX_PARTS, max_field_bytes=MAX_FIELD_BYTES):
    """The :class:`Form` in ``body`` (bytes), sent with ``content_type``; raises RunaiError
    ``bad_request`` for a body that is not well-formed multipart/form-data within bounds."""
    delimiter = b"--" + boundary_of(content_type)
    form = Form()
    # The first delimiter opens the body (after an optional preamble, which is ignored).
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise _bad("the boundary never appears in it")
        position = start + 2 + len(delimiter)
    parts = 0
    while True:
        if body.startswith(b"--", position):
            return form  # the closing delimiter; an epilogue after it is ignored
        line_end = body.find(b"\r\n", position, position + 256)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise _bad("a delimiter is not followed by a line end")
        parts += 1
        if parts > max_parts:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"the body has more than {max_parts} parts")
        header_start = line_end + 2
        if body.startswith(b"\r\n", header_start):
            raise _bad("a part has no headers")
        header_end = body.find(b"\r\n\r\n", header_start, header_start + MAX_HEADER_BYTES)
        if header_end < 0:
            raise _bad(f"a part's headers are missing their end or longer than {MAX_HEADER_BYTES} bytes")
        name, filename, part_type = _headers(body[header_start:header_end + 2])
        data_start = header_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise _bad("it ends inside a part (truncated?)")
        position = data_end + 2 + len(delimiter)
        if filename is not None:
            data = body[data_start:data_end]
            form.files.setdefault(name, []).append(File(name, filename, part_type, data))
            continue
        if data_end - data_start > max_field_bytes:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"the field {name!r} is longer than {max_field_bytes} bytes")
        try:
            text = body[data_start:data_end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.RunaiError(errors.BAD_ENCODING, f"the field {name!r} is not valid UTF-8 (byte {e.start})")
        form.fields.setdefault(name, []).append(text)
