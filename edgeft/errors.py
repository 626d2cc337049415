"""Errors whose message is written for the person running edgeft.

The CLI prints an :class:`EdgeftError` as one line and exits with status 2; anything else is our bug
and keeps its traceback. Set ``EDGEFT_RAISE_ERRORS=1`` to get the traceback for user errors too.
"""


class EdgeftError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(EdgeftError):
    """A build config (edgeft.toml), target file or CLI option is invalid."""


class DataError(EdgeftError):
    """A dataset file is missing or malformed."""


class ModelError(EdgeftError):
    """A model folder is missing, unreadable or of an unsupported architecture."""


class GateFailure(EdgeftError):
    """A quality gate failed; the build ran but its artifact must not ship."""

    exit_code = 1
