"""How both guidance servers (the standalone servicer, the Serve deployment) report a refused or failed call.

Each takes the server's own logger, so that a line names the module that answered the call.
"""

from __future__ import annotations

from shared.errors import ServiceError
from shared.grpcio import INTERNAL_ERROR_MESSAGE


def log_rejected(log, event: str, error: ServiceError, **fields) -> None:
    """A request refused with a ServiceError: one info line with its code, field and reason (not a bug: no trace)."""
    log.info(event, **fields, code=error.code.name, field=error.field, reason=error.message)


def internal_error(log, event: str, error: Exception, **fields) -> ServiceError:
    """A bug (not a ServiceError): logged with its traceback; the caller gets INTERNAL with a generic message."""
    log.error(event, exc_info=error, **fields)
    return ServiceError(INTERNAL_ERROR_MESSAGE)
