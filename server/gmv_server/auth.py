"""Who may call, and as which tenant: a gRPC server interceptor on every AttributionService
method (health and reflection stay open).

A credential is an API key sent as `authorization: Bearer <key>` (`gmv keys create`), or,
under mutual TLS, the client certificate, whose common name is the tenant. Each is one tenant
with roles: `attribute` (Attribute, AttributeStream), `read` (GetValuation, TopContributors),
`admin` (everything, for any tenant; RemoveContributor only). GetIndexInfo and ListCollections take any role.

Until the first key is created (and with no client CA) the server is open, as on a laptop:
the tenant is whatever a request says. Keys are read from the ledger's database and cached for
KEY_CACHE_S, so a new first key, a revocation or an expiry applies within seconds.
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from gmv_engine.errors import GMVError, PermissionDeniedError, UnauthenticatedError
from gmv_engine.ledger import ApiKey, Ledger, key_digest, split_key

log = logging.getLogger("gmv.server.auth")

SERVICE_PREFIX = "/gmv.v1.AttributionService/"
METHOD_ROLES = {
    "Attribute": ("attribute",), "AttributeStream": ("attribute",),
    "GetValuation": ("read",), "TopContributors": ("read",),
    "GetIndexInfo": ("attribute", "read"), "ListCollections": ("attribute", "read"),
    "RemoveContributor": ("admin",),
}
CERTIFICATE_ROLES = frozenset({"attribute", "read"})  # admin takes a key
KEY_CACHE_S = 2.0  # how stale a key's state (revoked, expired) may be on a running server


@dataclass(frozen=True)
class Identity:
    tenant_id: str
    roles: frozenset[str]
    credential: str  # "key <id>" or "certificate <common name>": for logs, never the secret

    @property
    def admin(self) -> bool:
        return "admin" in self.roles


CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("gmv_caller", default=None)


def tenant_for_attribution(requested: str) -> str:
    """The tenant a generation is recorded under: the caller's. A request may name it only to
    repeat it (or, with an admin key, to act for any tenant)."""
    caller = CALLER.get()
    if caller is None:  # an open server: the request's word
        return requested
    if requested and requested != caller.tenant_id and not caller.admin:
        raise PermissionDeniedError(f"this credential is for tenant '{caller.tenant_id}', not '{requested}'")
    return requested or caller.tenant_id


def tenant_for_reading(requested: str) -> str | None:
    """The tenant a ledger query covers: the caller's own; an admin's choice, or every tenant."""
    caller = CALLER.get()
    if caller is None or caller.admin:
        return requested or None
    if requested and requested != caller.tenant_id:
        raise PermissionDeniedError(f"this credential may read tenant '{caller.tenant_id}' only, not '{requested}'")
    return caller.tenant_id


class KeyCache:
    """Keys by id from the ledger's database, each re-read after KEY_CACHE_S."""

    def __init__(self, ledger: Ledger, ttl_s: float = KEY_CACHE_S):
        self.ledger = ledger
        self.ttl_s = ttl_s
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}
        self._exist: tuple[float, bool] = (-float("inf"), False)

    async def keys_exist(self) -> bool:
        checked, exist = self._exist
        if not exist and time.monotonic() - checked > self.ttl_s:  # once true, it stays true
            exist = await asyncio.to_thread(self.ledger.keys_exist)
            self._exist = (time.monotonic(), exist)
        return exist

    async def find(self, key_id: str) -> ApiKey | None:
        cached = self._keys.get(key_id)
        if cached is not None and time.monotonic() - cached[0] <= self.ttl_s:
            return cached[1]
        key = await asyncio.to_thread(self.ledger.find_key, key_id)
        if len(self._keys) > 10_000:  # unknown ids from a scanner must not grow it without bound
            self._keys.clear()
        self._keys[key_id] = (time.monotonic(), key)
        return key


class Authenticator:
    def __init__(self, keys: KeyCache, client_certificates: bool):
        self.keys = keys
        self.client_certificates = client_certificates

    async def enabled(self) -> bool:
        return self.client_certificates or await self.keys.keys_exist()

    async def identify(self, metadata, context) -> Identity | None:
        """The caller, or None on an open server; raises UnauthenticatedError."""
        if not await self.enabled():
            return None
        bearer = next((value for key, value in metadata or () if key == "authorization"), None)
        if bearer is not None:
            return await self._from_key(bearer)
        if self.client_certificates:
            names = context.auth_context().get("x509_common_name") or []
            if names:
                name = names[0].decode("utf-8", "replace")
                return Identity(name, CERTIFICATE_ROLES, f"certificate {name}")
        raise UnauthenticatedError("this server needs a credential: send `authorization: Bearer <key>` "
                                   "(gmv keys create)" + (" or a client certificate" if self.client_certificates else ""))

    async def _from_key(self, bearer: str) -> Identity:
        scheme, _, key = bearer.partition(" ")
        parts = split_key(key.strip()) if scheme.lower() == "bearer" else None
        if parts is None:
            raise UnauthenticatedError("the authorization metadata must be `Bearer <key>` with a key from gmv keys create")
        record = await self.keys.find(parts[0])
        # Compared in constant time: the id is public, the secret is not.
        if record is None or not hmac.compare_digest(record.secret_sha256, key_digest(key.strip())):
            raise UnauthenticatedError("unknown API key")
        if not record.usable(time.time()):
            raise UnauthenticatedError(f"API key {record.key_id} is {'revoked' if record.revoked_at else 'expired'}")
        return Identity(record.tenant_id, frozenset(record.roles), f"key {record.key_id}")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each AttributionService handler: identify the caller, check the method's role,
    and run the method with CALLER set (tasks it starts inherit it)."""

    def __init__(self, authenticator: Authenticator, refuse: Callable[[str, GMVError, object], object]):
        self.authenticator = authenticator
        self.refuse = refuse  # (method, error, context) -> awaitable that aborts the call with its status

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        name = method[len(SERVICE_PREFIX):]
        metadata = handler_call_details.invocation_metadata

        async def admit(context) -> contextvars.Token | None:
            try:
                caller = await self.authenticator.identify(metadata, context)
                if caller is not None and not caller.admin and not caller.roles & set(METHOD_ROLES.get(name, ())):
                    raise PermissionDeniedError(f"{name} needs the role {' or '.join(METHOD_ROLES[name])}; "
                                                f"{caller.credential} has {', '.join(sorted(caller.roles))}")
            except GMVError as exc:
                await self.refuse(name, exc, context)
                return None
            return CALLER.set(caller)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                token = await admit(context)
                try:
                    return await inner(request, context)
                finally:
                    CALLER.reset(token)
            return handler._replace(unary_unary=unary_unary)
        kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
        inner = getattr(handler, kind)

        async def streaming(request_or_iterator, context):
            token = await admit(context)
            try:
                async for response in inner(request_or_iterator, context):
                    yield response
            finally:
                CALLER.reset(token)
        return handler._replace(**{kind: streaming})
