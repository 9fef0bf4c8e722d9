"""Artifact downloads by sha256: devices get only what is offered to them; operators get any."""

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from cloud.api.deps import DeviceOrOperator, ReaderDep, ServicesDep
from cloud.api.problems import Problem
from cloud.api.schemas import errors
from cloud.registry.devices import offered_to
from cloud.registry.tables import Model

router = APIRouter(prefix="/api/v1/artifacts", tags=["artifacts"])
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="the artifact's sha256, lowercase hex")]


@router.get(
    "/{sha256}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the artifact's bytes"},
        **errors({404: "no such artifact, or not offered to this device"}),
    },
)
async def download(
    sha256: Sha256, reader: ReaderDep, services: ServicesDep, caller: DeviceOrOperator
) -> StreamingResponse:
    """Download a model artifact. A device may fetch only its desired or current model or one a
    rollout offers it; anything else answers 404, so a device cannot probe which artifacts exist."""
    if caller.device is not None and not await reader.run_sync(offered_to, caller.device, sha256):
        raise Problem(404, "Not Found", f"artifact {sha256} is not offered to {caller.device.id}")
    model = (await reader.scalars(select(Model).where(Model.sha256 == sha256).limit(1))).first()
    if model is None or not services.store.exists(sha256):
        raise Problem(404, "Not Found", f"artifact {sha256} not found")
    size = services.store.size(sha256)
    headers = {
        "Content-Length": str(size),
        "ETag": f'"{sha256}"',
        "Cache-Control": "private, immutable",
        "Content-Disposition": f'attachment; filename="{model.id}.{"tflite" if model.manifest else "bin"}"',
    }
    return StreamingResponse(
        services.store.open_chunks(sha256), media_type="application/octet-stream", headers=headers
    )
