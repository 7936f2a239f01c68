# -*- test-case-name: runai.test.test_checkpoint,runai.test.test_cache,runai.test.test_convert -*-
"""The model library's errors: each a :class:`runai.core.errors.RunaiError` that always
carries the same code, raised with its message alone.

A model that cannot be loaded and a checkpoint that cannot be read are
``model_load_failed``; a conversion that cannot finish is ``convert_failed``. The message
says what is wrong, and where, in words fit for a client: never the server's own paths.
"""

from runai.core import errors

# Cap on how much of an unforeseen exception's text goes into a client's error message.
MAX_CAUSE_CHARS = 500


class LoadError(errors.RunaiError):
    """A model that cannot be loaded; the message names what is missing, and where."""

    def __init__(self, message):
        super().__init__(errors.MODEL_LOAD_FAILED, message)


class CheckpointError(errors.RunaiError):
    """A checkpoint that cannot be read, or that was refused."""

    def __init__(self, message):
        super().__init__(errors.MODEL_LOAD_FAILED, message)


class ConvertError(errors.RunaiError):
    """A conversion that cannot finish (a model that cannot be mapped, a destination taken)."""

    def __init__(self, message):
        super().__init__(errors.CONVERT_FAILED, message)
