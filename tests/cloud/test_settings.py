"""cloud.settings.Settings: the RD recipes an operator names are checked where they are read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud.settings import Settings


def test_the_default_recipes_are_the_searchs() -> None:
    from cloud.ml.recipes import SearchConfig, search_of

    assert search_of(Settings().rd_recipes) == SearchConfig()


@pytest.mark.parametrize("value", ["", ",", "relabel;rm -rf /", "re-KD,", "x" * 41, ",".join(["re-KD"] * 17)])
def test_garbage_recipes_are_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DIREDI_RD_RECIPES", value)
    with pytest.raises(ValidationError, match="rd_recipes"):
        Settings()
