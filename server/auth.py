"""``--api-key``: every generation and admin route requires ``Authorization: Bearer KEY``.

Health probes (``/health``, ``/health_generate``), ``/metrics`` and the API schema stay open,
as in SGLang, so that load balancers and Prometheus need no secret.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from heteroserve.server.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="the server's --api-key")


def require_api_key(request: Request,
                    creds: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """FastAPI dependency: pass when the server has no API key or the request carries it as a
    Bearer token; otherwise raise a 401 ``invalid_api_key`` (compared in constant time)."""
    key = request.app.state.ctx.server_args.api_key
    if not key:
        return
    if creds is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(creds.credentials.encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
