# -*- test-case-name: runai.test.test_legacy_parse,runai.test.test_requests -*-
"""Typed, bounded reading of a request's fields, whatever door it came through.

A door says where a field is and what to call it in an error (:meth:`Fields.lookup`);
this class says what a valid value is. Every error names the field as the client wrote it.
"""

from runai.core import errors


def check_integer(value, label, low, high):
    """``value`` as an int within ``low..high``; ``label`` names it in the error.

    JSON has one number type: 20.0 is taken for 20, but true is not taken for 1.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.RunaiError(errors.BAD_REQUEST, f"{label} must be an integer")
    if not low <= value <= high:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"{label} must be between {low} and {high}, not {value}")
    return value


class Fields:
    """The fields of one request. Subclasses implement :meth:`lookup`."""

    def lookup(self, name):
        """``(label, value)``: the field's name for error messages (``"option 'steps'"``)
        and its raw value, None when absent (then the label names where it belongs)."""
        raise NotImplementedError

    def raw(self, name):
        return self.lookup(name)[1]

    def string(self, name, default=None, max_chars=None):
        label, value = self.lookup(name)
        if value is None:
            if default is None:
                raise errors.RunaiError(errors.BAD_REQUEST, f"missing {label}")
            return default
        if not isinstance(value, str):
            raise errors.RunaiError(errors.BAD_REQUEST, f"{label} must be a string")
        if max_chars is not None and len(value) > max_chars:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"{label} is longer than {max_chars} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            # JSON can carry a lone surrogate ("\ud83d"), which is no text: the tokenizer,
            # the history and every encoder after it would fail on it.
            raise errors.RunaiError(
                errors.BAD_REQUEST, f"{label} is not valid text: a lone surrogate at character {e.start}")
        return value

    def integer(self, name, default, low, high, required=False):
        label, value = self.lookup(name)
        if value is None:
            if required:
                raise errors.RunaiError(errors.BAD_REQUEST, f"missing {label}")
            return default
        return check_integer(value, label, low, high)

    def number(self, name, default, low, high):
        label, value = self.lookup(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise errors.RunaiError(errors.BAD_REQUEST, f"{label} must be a number")
        if not low <= value <= high:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"{label} must be between {low} and {high}, not {value}")
        return float(value)

    def boolean(self, name, default=False):
        label, value = self.lookup(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise errors.RunaiError(errors.BAD_REQUEST, f"{label} must be true or false")
        return value


class DictFields(Fields):
    """Fields in a plain mapping, by their own names."""

    def __init__(self, values, label="option {!r}"):
        self.values = values
        self.label = label

    def lookup(self, name):
        return self.label.format(name), self.values.get(name)
