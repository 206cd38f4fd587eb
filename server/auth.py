"""Admin authentication: every livetower.v1.EngineAdmin call needs `authorization: Bearer <token>`.

The token comes from the config, else from a token file (default <data_dir>/admin.token), which is
created with a random token (mode 0600) when missing, so a server is never open by default. Calls
without the right token get UNAUTHENTICATED before any handler runs, so they change nothing.
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
from pathlib import Path

import grpc

from proto import livetower_v1_pb2 as pb

ADMIN_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["EngineAdmin"].full_name + "/"
AUTH_HEADER = "authorization"


def load_or_create_token(path: Path) -> str:
    """The token in `path`; a new random one is written there (0600) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # atomic and exclusive: servers starting together agree on one token
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty; put a token in it or delete it to get a new one")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, token_hint: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._hint = token_hint  # where an operator finds the token (never the token itself)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(ADMIN_PREFIX):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        problem = ("missing 'authorization' metadata" if not given else "wrong admin token")
        message = f"{problem}: admin calls need 'authorization: Bearer <token>'; the token is in {self._hint}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
