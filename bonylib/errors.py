"""User-facing errors.

A :class:`BonyError` is a problem with the user's input (a file, a config key, a folder), not a
bug: the CLI prints its message on one line and exits non-zero, without a traceback. Messages
name the file or key and say what is wrong with it.
"""


class BonyError(Exception):
    """Bad input that the user can fix; the message names the culprit."""


class ConfigError(BonyError):
    """A config file or ``key=value`` override that cannot be used."""
