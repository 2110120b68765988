"""Errors the engine raises at submit time; the API maps each to an HTTP status."""


class EngineError(Exception):
    """Base class for every error the engine reports to a caller."""


class InvalidRequestError(EngineError):
    """The request can never run as asked (too long, bad parameters): a 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class EngineOverloadedError(EngineError):
    """The waiting queue is full: a 503 with Retry-After."""


class EngineNotRunningError(EngineError):
    """The engine is stopped, draining or its loop has died: a 503."""


class AdapterNotFoundError(EngineError):
    """The request names a LoRA adapter this engine does not serve: a 404."""


class AdapterLoadError(EngineError):
    """An adapter cannot be loaded or unloaded as asked (a bad folder, a taken name): a 400."""
