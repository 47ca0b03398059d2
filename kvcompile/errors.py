"""The errors kvcompile raises on bad input.

Each carries one line that says what is wrong and what to do about it; the CLI prints
that line (no traceback unless ``--debug``) and exits non-zero.
"""

from __future__ import annotations


class KvcompileError(Exception):
    """Base class: a problem with the user's input, not a bug in kvcompile."""

    exit_code = 2


class CorpusError(KvcompileError):
    """The corpus is missing, empty or unreadable."""


class RecipeError(KvcompileError):
    """A recipe or probe file is missing or malformed."""


class ModelError(KvcompileError):
    """A model cannot be found, assembled or loaded."""


class PackError(KvcompileError):
    """A pack is corrupt, truncated, from a newer format, or otherwise unreadable."""


class ModelMismatchError(PackError):
    """A pack is used with another model than the one it was built with."""


class QuestionError(KvcompileError):
    """A question is empty or does not fit the model's remaining context."""


class OptionError(KvcompileError):
    """A command-line or API option is out of range or contradicts another."""
