"""The app's lifespan: engines opened and closed, the garbage collector tuned only when asked."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from cloud.api.main import create_app
from cloud.settings import Settings


def test_the_lifespan_tunes_the_collector_when_asked_and_closes_the_reader(settings: Settings) -> None:
    # Prepare
    before = gc.get_threshold()
    app = create_app(settings.model_copy(update={"api_tune_gc": True}))

    # Execute
    try:
        with TestClient(app) as client:
            during = gc.get_threshold()
            frozen = gc.get_freeze_count()
            alive = client.get("/healthz").status_code
        after_stop = app.state.services.readers
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

    # Assert
    assert alive == 200
    assert during == (50_000, 50, 100)
    assert frozen > 0
    assert after_stop is None  # the reader engine was disposed with the app


def test_the_collector_is_left_alone_by_default_in_tests(settings: Settings) -> None:
    before = gc.get_threshold()

    with TestClient(create_app(settings)):
        during = gc.get_threshold()

    assert during == before
