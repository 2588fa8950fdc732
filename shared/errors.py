"""The project's exception hierarchy: one base, subclasses where callers tell them apart."""


class TokenrelayError(Exception):
    """Base of every error tokenrelay raises on purpose."""


class ConfigError(TokenrelayError):
    """A setting in the environment is missing or malformed; the message names the variable."""


class ModelError(TokenrelayError):
    """The model backend failed while generating; ends the message with an error event."""

    error_type = "model_error"
