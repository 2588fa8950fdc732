"""The project's exception hierarchy: one base, subclasses where callers tell them apart."""


class TokenrelayError(Exception):
    """Base of every error tokenrelay raises on purpose."""


class ConfigError(TokenrelayError):
    """A setting in the environment is missing or malformed; the message names the variable."""


class ModelError(TokenrelayError):
    """The model backend failed while generating; ends the message with an error event.

    ``status`` and ``code`` carry what an upstream answered (say 400, ``context_length_exceeded``)
    so that clients get the same answer they would have had from it directly.
    """

    error_type = "model_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
