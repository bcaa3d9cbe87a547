"""User-facing errors.

A :class:`BonyError` is a problem with the user's input (a file, a config key, a folder), not a
bug: the CLI prints its message on one line and exits non-zero, without a traceback. Messages
name the file or key and say what is wrong with it.
"""


class BonyError(Exception):
    """Bad input that the user can fix; the message names the culprit."""


class ConfigError(BonyError):
    """A config file or ``key=value`` override that cannot be used."""


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An error's message on one line (load_state_dict lists keys over many lines, a DataLoader worker's error carries
    its traceback), cut to ``limit`` characters; the exception's type name when it has no message."""
    text = " ".join(str(exc).split()) or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text if len(text) <= limit else text[:limit] + " ..."
