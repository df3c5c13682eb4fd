"""Typed errors of the core. The service maps each to an HTTP status and OpenAI's error JSON shape."""

from __future__ import annotations


class RyzansteinError(Exception):
    """Base of every error the core raises on purpose. `message` is written for the user."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:  # a more precise code than the class's (e.g. unsupported_parameter)
            self.code = code


class InvalidRequest(RyzansteinError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ModelNotFound(RyzansteinError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class UnsafeCheckpoint(RyzansteinError):
    """A pickle checkpoint (.bin/.pt/.pth): loading it could run arbitrary code, so we refuse."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "unsafe_checkpoint"


class InvalidModel(RyzansteinError):
    """A file or folder that cannot be read as a model (missing config, corrupt weights, …)."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_model"


class ModelLoadFailed(RyzansteinError):
    status_code = 500
    error_type = "server_error"
    code = "model_load_failed"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Cancelled(RyzansteinError):
    status_code = 499
    error_type = "cancelled"
    code = "cancelled"


class DefaultModelUnavailable(RyzansteinError):
    status_code = 503
    error_type = "server_error"
    code = "default_model_unavailable"


class ModelBusy(RyzansteinError):
    """The model is generating, loaded, or held by a job: the operation would break it."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "model_busy"


class OutOfMemoryBudget(RyzansteinError):
    status_code = 507
    error_type = "insufficient_memory"
    code = "out_of_memory_budget"


class QueueFull(RyzansteinError):
    """Too many requests are queued for one model; the client should retry later (HTTP 429 + Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int = 5):
        super().__init__(message, param=param)
        self.retry_after = max(1, int(retry_after))


class QueueTimeout(QueueFull):
    """A request waited in a model's queue past the deadline without starting (HTTP 503 + Retry-After)."""

    status_code = 503
    error_type = "server_error"
    code = "queue_timeout"


class GenerationFailed(RyzansteinError):
    """One request's step failed inside the engine; the other requests of the batch go on."""

    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


class PortInUse(RyzansteinError):
    """The service's port is taken by another process (another service, or any other program)."""

    code = "port_in_use"


class ClusterError(RyzansteinError):
    """A cluster operation cannot be done as asked (unknown node, not paired, no plan fits)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "cluster_error"


class PairingFailed(RyzansteinError):
    """Pairing was refused: wrong, expired or used-up PIN, too many tries, or a tampered exchange."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "pairing_failed"


class NodeLost(RyzansteinError):
    """A cluster node stopped answering during a split model's step; the request fails, the cluster re-plans."""

    status_code = 503
    error_type = "server_error"
    code = "node_lost"


class RemoteCodeNotApproved(RyzansteinError):
    """A model's own Python code would run on load, and the user has not approved these exact files."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "remote_code_not_approved"

    def __init__(self, message: str, *, files: list[dict], param: str | None = None):
        super().__init__(message, param=param)
        self.files = files
