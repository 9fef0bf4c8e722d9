"""Credentials the operators manage: API keys (admin) and the cloud's public signing keys."""

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from cloud.api.deps import Admin, PageQuery, ReaderDep, ServicesDep, SessionDep, Viewer
from cloud.api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, Page, TrustedKey, errors
from cloud.registry import apikeys, audit
from cloud.registry.common import paginate
from cloud.registry.tables import ApiKey

router = APIRouter(prefix="/api/v1", tags=["keys"])


@router.get("/api-keys")
async def list_keys(reader: ReaderDep, _: Admin, page: Annotated[PageQuery, Query()]) -> Page[ApiKeyPublic]:
    """List API keys (never their secrets)."""
    rows, total = await reader.run_sync(
        paginate, select(ApiKey).order_by(ApiKey.created_at, ApiKey.id), limit=page.limit, offset=page.offset
    )
    return Page.of(ApiKeyPublic, rows, total, limit=page.limit, offset=page.offset)


@router.post("/api-keys", status_code=201)
def create_key(body: ApiKeyCreate, session: SessionDep, caller: Admin) -> ApiKeyCreated:
    """Create an API key; its secret is in this response only."""
    row, secret = apikeys.create_key(session, role=body.role, name=body.name)
    audit.record(session, actor=caller.actor, action="apikey.create", target=row.id, role=body.role.value)
    session.commit()
    return ApiKeyCreated(key=ApiKeyPublic.model_validate(row), secret=secret)


@router.post("/api-keys/{key_id}/revoke", responses=errors({404: "no such key"}))
def revoke_key(key_id: str, session: SessionDep, services: ServicesDep, caller: Admin) -> ApiKeyPublic:
    """Revoke an API key: requests bearing it are refused from now on (by other API processes, after
    at most `api_key_cache_seconds`)."""
    row = apikeys.deactivate(session, key_id)
    audit.record(session, actor=caller.actor, action="apikey.revoke", target=key_id)
    session.commit()
    services.keys.clear()
    return ApiKeyPublic.model_validate(row)


@router.get("/signing-keys")
def signing_keys(services: ServicesDep, _: Viewer) -> list[TrustedKey]:
    """The cloud's trusted Ed25519 public keys by key_id, for provisioning devices."""
    return [TrustedKey.model_validate(k) for k in services.keyring.public_keys()]
