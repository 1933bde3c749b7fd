"""Exceptions raised for bad input.

Every error a user can cause (a bad config, a broken checkpoint, a prompt that
does not fit) is raised as a subclass of :class:`Eagle3Error` with a message
that says what is wrong and how to fix it; the CLI prints the message and exits
non-zero instead of showing a traceback.
"""


class Eagle3Error(Exception):
    """Base class of the errors caused by user input."""


class ConfigError(Eagle3Error, ValueError):
    """A config.json is malformed, incomplete, or asks for something unsupported."""


class CheckpointError(Eagle3Error):
    """A checkpoint is missing, truncated, or does not match its config."""


class InputError(Eagle3Error, ValueError):
    """Arguments to generation (prompts, lengths, sampling knobs) are invalid."""


class NumericsError(Eagle3Error):
    """The model produced non-finite logits (NaN or Inf): broken weights, or a dtype that overflows."""
