"""Exceptions whose messages are safe and useful to show a user.

Each message says what went wrong and what to do. The CLI, the UI and the API turn these into
messages (exit status 2, a notice, an HTTP error); nothing else catches broadly. This module knows
nothing of where the message is shown.
"""


class DomainchatError(Exception):
    """Base class: the message is meant for the user, one line, with what to do."""


class ConfigError(DomainchatError):
    """A configuration file or environment variable is invalid. The message names the file and key."""


class UnknownDomain(DomainchatError):
    """A request named a domain that does not exist (or is out of service)."""


class BadInput(DomainchatError):
    """A question, file or request is empty, too long or otherwise unusable."""


class ModelUnavailable(DomainchatError):
    """The base model cannot be found, converted or loaded."""


class TooLarge(BadInput):
    """An input is over an explicit limit (question length, file size, tokens)."""


class EmbeddingMismatch(ConfigError):
    """A knowledge store was built with another embedding model than DOMAINCHAT_EMBED_MODEL names: its
    vectors and the question's would not be comparable."""


class StoreInUse(DomainchatError):
    """Another process holds the embedded knowledge store."""


class Busy(DomainchatError):
    """Too many requests are waiting; the client should try again shortly."""
