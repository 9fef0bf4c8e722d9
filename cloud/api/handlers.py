"""The exception handlers that answer every error as a problem (problems.py), and the OpenAPI that
says so."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from cloud.api import schemas
from cloud.api.deps import authentication_problem
from cloud.api.problems import MEDIA_TYPE, TITLES, Problem, problem
from cloud.exceptions import (
    ArtifactStoreError,
    CloudError,
    ConflictError,
    InvalidValueError,
    NotFoundError,
    SigningError,
)

log = logging.getLogger(__name__)


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _allowed(request: Request) -> str:
    """Every method some route serves on the request's path, for the Allow header of a 405."""
    methods: set[str] = set()
    for context in iter_route_contexts(request.app.routes):
        match, _ = context.matches(request.scope)
        if match is not Match.NONE:
            methods |= context.methods or set()
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into problems."""

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = TITLES.get(exc.status_code, "Error")
        detail, headers = str(exc.detail), dict(exc.headers or {})
        if exc.status_code == 405:
            # The router names the methods of the first route on this path only (GET of GET and POST).
            headers["Allow"] = _allowed(request) or headers.get("Allow", "")
        # The router's own 404 and 405 say no more than their title; say what the caller can do.
        if detail == title and exc.status_code == 404:
            detail = f"no route {request.url.path}"
        elif detail == title and exc.status_code == 405:
            detail = f"this route allows {headers['Allow']}"
        return problem(exc.status_code, title, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI parses the body before any dependency runs; an unauthenticated caller still gets the
        # 401 every route promises (or the 429 of a source with too many failures), and learns nothing
        # about the body's shape.
        if (refused := await authentication_problem(request)) is not None:
            return problem(refused.status, refused.title, refused.detail, headers=refused.headers)
        errors = [{"location": _location(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5])
        return problem(422, TITLES[422], detail, errors=errors)

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return problem(404, TITLES[404], str(exc))

    @app.exception_handler(ConflictError)
    async def _conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return problem(409, TITLES[409], str(exc))

    @app.exception_handler(InvalidValueError)
    async def _invalid_value(_: Request, exc: InvalidValueError) -> JSONResponse:
        # A rule only the registry can check (the labels a device would end up with): a validation
        # problem like the others, its one error about the request as a whole.
        return problem(422, TITLES[422], str(exc), errors=[{"location": "request", "message": str(exc)}])

    @app.exception_handler(ArtifactStoreError)
    async def _artifact(_: Request, exc: ArtifactStoreError) -> JSONResponse:
        return problem(404, TITLES[404], str(exc))

    @app.exception_handler(SigningError)
    async def _signing(_: Request, exc: SigningError) -> JSONResponse:
        log.error("signing failed: %s", exc)
        return problem(503, TITLES[503], "the signing key is unavailable")

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable: %s", exc.orig)
        return problem(503, TITLES[503], "the database is unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        # Two writers raced past the same check (say, two provisionings of one id): the loser's conflict.
        log.info("integrity conflict: %s", exc.orig)
        return problem(409, TITLES[409], "the request conflicts with a concurrent change; retry or re-read")

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        log.warning("the database refused a value: %s", exc.orig)
        return problem(422, TITLES[422], "the database refused a value of the request")

    @app.exception_handler(CloudError)
    async def _cloud(_: Request, exc: CloudError) -> JSONResponse:
        return problem(400, TITLES[400], str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %r", request.method, request.url.path)
        return problem(500, TITLES[500], "an unexpected error; it has been logged")


def document(app: FastAPI, *, public: set[str]) -> None:
    """Make the OpenAPI tell the truth about errors: problem+json bodies, the 422's field errors, and
    the 401/403/429 every route but the `public` ones can answer."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (schemas.Problem, schemas.ValidationProblem):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(definition.pop("$defs", {}))
            components[model.__name__] = definition
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        problem_ref = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        too_many = {
            "description": "too many failed authentications from this address; credentials not checked",
            "headers": {
                "Retry-After": {
                    "description": "whole seconds until this address may try again",
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
            "content": problem_ref,
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for status, response in responses.items():
                    if status[0] in "45":
                        body = response.get("content", {}).get("application/json", {"schema": {}})
                        response["content"] = {MEDIA_TYPE: body}
                if "422" in responses:
                    responses["422"]["content"] = {
                        MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}
                    }
                if path not in public:
                    responses.setdefault(
                        "401", {"description": "no valid credentials", "content": problem_ref}
                    )
                    responses.setdefault(
                        "403", {"description": "a role too low for this route", "content": problem_ref}
                    )
                    responses.setdefault("429", too_many)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
