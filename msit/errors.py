"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class MsitError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ConfigError(MsitError):
    """A config or spec file (or a command-line option) is invalid."""


class DataValidationError(MsitError):
    """Input data breaks the scene-log schema."""
