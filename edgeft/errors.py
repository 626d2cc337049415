"""Errors whose message is written for the person running edgeft.

The CLI prints an :class:`EdgeftError` as one line and exits with its ``exit_code``: 2 for bad input,
1 for a failed gate, 3 for :class:`InternalError` (something broke that the user's input does not
explain). Any other exception is our bug: the CLI prints it as one ``internal error`` line and exits
3 too (never 1, which CI would read as a failed gate). Set ``EDGEFT_RAISE_ERRORS=1`` to get the
traceback of any of them.
"""


class EdgeftError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(EdgeftError):
    """A build config (edgeft.toml), target file or CLI option is invalid."""


class DataError(EdgeftError):
    """A dataset file is missing or malformed."""


class ModelError(EdgeftError):
    """A model, adapter, artifact or reference folder is missing, unreadable, broken or unsupported."""


class OutputError(EdgeftError):
    """An output path edgeft may not write to (a file, or a folder edgeft did not create)."""


class GateFailure(EdgeftError):
    """A quality gate failed; the build ran but its artifact must not ship."""

    exit_code = 1


class InternalError(EdgeftError):
    """A measurement subprocess crashed or hung: not the user's input, so not exit status 2."""

    exit_code = 3


def first_line(error: BaseException, limit: int = 240) -> str:
    """A third-party exception's message as one short line (peft's size mismatches run to dozens)."""
    text = str(error).strip() or type(error).__name__
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return line if len(line) <= limit else line[: limit - 1] + "…"
