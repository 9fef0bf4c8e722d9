"""The operator API application: it creates the services and includes one router per resource."""

import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from cloud.api import handlers
from cloud.api.deps import KeyCache, Services, well_formed_request
from cloud.api.guard import AuthGuard
from cloud.api.limits import BodyLimit
from cloud.api.metrics import RequestMetrics
from cloud.api.metrics import router as metrics_router
from cloud.api.routes import (
    artifacts,
    audit,
    cohorts,
    commands,
    devices,
    enrolments,
    health,
    jobs,
    keys,
    knowledge,
    models,
    rollouts,
    telemetry,
)
from cloud.artifacts import LocalArtifactStore
from cloud.provisioning import CredentialHook
from cloud.registry.db import make_engine, session_factory
from cloud.settings import Settings
from cloud.signing import KeyRing

DESCRIPTION = """Operate a DiReDi fleet: devices, cohorts, models and their lineage, knowledge reports, jobs,
rollouts and telemetry.

Operators authenticate with `Authorization: Bearer <API key>` (roles viewer < operator < admin);
devices with HTTP Basic (`device_id:secret`), for their artifact downloads only. Errors are RFC 9457
`application/problem+json`."""


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a request server: what was loaded at start-up is frozen
    out of the collector's scans, and the youngest generation is collected every 50,000 allocations
    rather than 700 (what it is worth: docs/registry-and-api.md)."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def create_app(settings: Settings | None = None, *, hooks: Sequence[CredentialHook] = ()) -> FastAPI:
    """The API for `settings` (default: from the environment), telling `hooks` of device credentials."""
    settings = settings or Settings()
    engine = make_engine(settings.resolved_database_url)
    services = Services(
        settings=settings,
        sessions=session_factory(engine),
        store=LocalArtifactStore(settings.resolved_artifact_dir),
        keyring=KeyRing.open(settings.resolved_signing_key_dir),
        hooks=list(hooks),
        keys=KeyCache(settings.api_key_cache_seconds),
        guard=AuthGuard(settings.api_auth_failure_burst, settings.api_auth_failure_window_seconds),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.start()
        if settings.api_tune_gc:
            tune_gc()
        yield
        await services.close()

    app = FastAPI(
        lifespan=lifespan,
        title="DiReDi fleet",
        version="1",
        description=DESCRIPTION,
        openapi_tags=[{"name": "health", "description": "liveness and readiness"}],
        dependencies=[Depends(well_formed_request)],
    )
    app.state.services = services
    handlers.install(app)
    handlers.document(app, public={"/healthz"})
    for module in (
        health,
        cohorts,
        devices,
        commands,
        models,
        artifacts,
        knowledge,
        jobs,
        rollouts,
        telemetry,
        keys,
        audit,
        enrolments,
    ):
        app.include_router(module.router)
    app.include_router(metrics_router)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(RequestMetrics)
    return app
