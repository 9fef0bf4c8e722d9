"""A line version survives the registry: registered, then rebuilt from the store, it predicts the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import RegistryError
from cloud.ml.data import ScenarioData
from cloud.ml.families import NetSpec
from cloud.ml.line import EdgeLine
from cloud.pipeline.lines import load_line, register_line, unpack_cloud_weights
from tests.cloud.factories import make_cohort


@pytest.mark.slow
def test_a_registered_line_is_rebuilt_exactly(
    session: Session, tmp_path: Path, base_line: EdgeLine, small_data: ScenarioData
) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path / "artifacts")
    make_cohort(session, "base")
    spec = NetSpec(num_classes=small_data.num_classes)
    cloud, edge = register_line(session, store, base_line, spec, metrics={"val_int8_acc": 0.9})
    session.commit()

    # Execute
    rebuilt, rebuilt_spec = load_line(session, store, edge.id)

    # Assert
    assert (cloud.id, edge.id, edge.teacher_id) == ("base.cloud.v1", "base.v1", cloud.id)
    assert rebuilt_spec == spec
    assert rebuilt.artifact.model == base_line.artifact.model
    assert rebuilt.artifact.manifest == base_line.artifact.manifest
    x = torch.from_numpy(small_data.val.x[:32])
    with torch.no_grad():
        for net, original in ((rebuilt.teacher, base_line.teacher), (rebuilt.student, base_line.student)):
            assert np.array_equal(net(x).numpy(), original.eval()(x).numpy())


def test_weights_that_are_not_a_cloud_model_are_refused() -> None:
    with pytest.raises(RegistryError, match="unreadable"):
        unpack_cloud_weights(b"not a torch file")
