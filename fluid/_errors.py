"""Errors in what a user asked for, as opposed to bugs.

The `fluid` command prints a `UserError`'s message alone and exits with status 2 (`--debug`
or `FLUID_DEBUG=1` shows the traceback); any other exception is a bug and shows its
traceback. Each class also derives from the built-in exception a caller would expect
(`ValueError`, `KeyError`, ...), so `except ValueError` keeps working.
"""


class UserError(Exception):
    """An input, file or setting that cannot be used; the message says what to do."""

    def __str__(self) -> str:
        # KeyError quotes its message; a user error reads as written.
        return BaseException.__str__(self)


class ConfigError(UserError, ValueError):
    """A config value outside its valid range, or values that do not fit together."""


class ConfigKeyError(UserError, KeyError):
    """An unknown config key, preset or option name."""


class ConfigTypeError(UserError, TypeError):
    """A config value of the wrong type, or component kwargs that do not fit the class."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist, or holds nothing usable."""


class OutputExistsError(UserError, FileExistsError):
    """A file or folder a command would write exists already; nothing is overwritten."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became infinite or NaN."""
