"""Who may call what: the admin token (every livetower.v1.EngineAdmin call) and producer tokens (LogEvents).

The admin token is handed over by the caller (the CLI reads LIVETOWER_ADMIN_TOKEN) or read from a token file
(default <data_dir>/admin.token), created with a random token (mode 0600) when missing, so a server is never
open by default. Producer tokens, when configured, come from a file of `name:token` lines. Every secret file
must be private (contracts/secret_files.py). Calls without the right token get UNAUTHENTICATED before any
handler runs, so they change nothing.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from contracts.secret_files import check_private, load_or_create_secret
from proto import livetower_v1_pb2 as pb

ADMIN_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["EngineAdmin"].full_name + "/"
LOG_EVENTS = "/" + pb.DESCRIPTOR.services_by_name["Recommender"].full_name + "/LogEvents"
AUTH_HEADER = "authorization"
MIN_TOKEN_CHARS = 16


def load_or_create_token(path: Path) -> str:
    """The admin token in `path`; a new random one is written there (0600) when the file does not exist."""
    return load_or_create_secret(path, "admin token")


def load_producer_tokens(path: Path) -> dict[str, str]:
    """token -> producer name from a private file of `name:token` lines ('#' comments and blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"producer_tokens_file {path} does not exist")
    check_private(path, "producer tokens")
    tokens: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or not name or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"producer tokens file {path} line {n}: expected 'name:token' with a token of at least "
                             f"{MIN_TOKEN_CHARS} characters")
        if token in tokens:
            raise ValueError(f"producer tokens file {path} line {n}: producer {name!r} reuses the token of "
                             f"{tokens[token]!r}; each producer needs its own")
        tokens[token] = name
    if not tokens:
        raise ValueError(f"producer tokens file {path} has no 'name:token' line")
    return tokens


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),)


def bearer_of(handler_call_details) -> str:
    """The token of the call's `authorization: Bearer <token>` metadata ("" when absent or malformed)."""
    given = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
    if isinstance(given, bytes):
        given = given.decode(errors="replace")
    scheme, _, token = given.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def deny(handler, code: grpc.StatusCode, message: str):
    """A handler that answers `code` without running (or parsing into) the real one."""
    async def refuse(request, context):
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=None,
                                               response_serializer=handler.response_serializer)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, token_hint: str) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must be at least {MIN_TOKEN_CHARS} characters")
        self._expected = token.encode()
        self._hint = token_hint  # where an operator finds the token (never the token itself)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(ADMIN_PREFIX):
            return handler
        given = bearer_of(handler_call_details)
        if given and hmac.compare_digest(given.encode(), self._expected):
            return handler
        problem = "missing 'authorization' metadata" if not given else "wrong admin token"
        return deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                    f"{problem}: admin calls need 'authorization: Bearer <token>'; the token is in {self._hint}")


def producer_of(tokens: dict[str, str], given: str) -> str | None:
    """The producer whose token `given` is (constant-time per comparison), else None."""
    found = None
    for token, name in tokens.items():
        if hmac.compare_digest(given.encode(), token.encode()):
            found = name
    return found
