"""One router module per resource, each with `router = APIRouter(prefix=..., tags=[...])`."""
