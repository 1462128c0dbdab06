"""The errors glmjax raises for bad user input: one family, so a command line catches one class.

All are ValueErrors (a bad value was passed in), and every message names the field, file or argument at
fault. Anything else that escapes glmjax is a bug, not an input error.
"""

from __future__ import annotations


class GlmjaxError(ValueError):
    """Bad user input: a config, a checkpoint, or an argument. `serve.py` prints it as one line."""


class ConfigError(GlmjaxError):
    """A config.json that glmjax cannot run; the message names the offending field."""


class CheckpointError(GlmjaxError):
    """A checkpoint that does not match its config or is damaged; the message names the tensor or file."""


class InputError(GlmjaxError):
    """Arguments of the model's forward, the decoder or the command line; the message names the argument."""
