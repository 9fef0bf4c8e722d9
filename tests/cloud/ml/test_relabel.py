"""The knowledge read as a class map, and the student's head composed with it (the relabel recipe)."""

from __future__ import annotations

import copy

import numpy as np
import numpy.typing as npt
import pytest
import torch

from cloud.ml.cycle import relabel_head
from cloud.ml.families import NetSpec
from cloud.ml.nets import EdgeStudent
from cloud.ml.rd_update import Knowledge
from cloud.ml.recipes import RECIPES, REKD, RELABEL, RELABEL_REKD, applies, search_of

C = 10


def knowledge(moves: dict[int, int], *, supported: bool = True, share: float = 0.8) -> Knowledge:
    """Knowledge whose map sends `share` of each source class to its destination."""
    preference = np.eye(C, dtype=np.float32)
    support = np.zeros((C, C), dtype=bool)
    for src, dst in moves.items():
        preference[src, src], preference[src, dst] = 1 - share, share
        support[src, dst] = supported
    return Knowledge(
        base_model_id="base.v1",
        preference=preference,
        support=support,
        noised=False,
        deltas=[],
        report_count=1,
        sample_count=100,
    )


def predictions(student: EdgeStudent, x: torch.Tensor) -> npt.NDArray[np.int64]:
    with torch.no_grad():
        out: npt.NDArray[np.int64] = student(x).argmax(dim=1).numpy()
    return out


@pytest.fixture
def student_and_inputs() -> tuple[EdgeStudent, torch.Tensor, float]:
    torch.manual_seed(0)
    student = NetSpec().build()[1].eval()
    x = torch.rand(2000, 64)
    with torch.no_grad():
        floor = float(student(x).min())
    return student, x, floor


def test_the_class_map_follows_only_supported_moves() -> None:
    # Prepare: 3 → 8 is supported, 5 → 2 is not (noise that did not stand out)
    known = knowledge({3: 8})
    unsupported = knowledge({5: 2}, supported=False)

    # Execute / Assert
    assert known.class_map().tolist() == [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]
    assert unsupported.class_map().tolist() == list(range(C))
    assert known.mapped_labels(np.array([3, 8, 0])).tolist() == [8, 8, 0]


def test_a_split_row_keeps_its_class() -> None:
    # Prepare: the user labels only a third of the model's 4s as 7
    split = knowledge({4: 7}, share=0.3)

    # Execute / Assert: the row's top class is still 4
    assert split.class_map()[4] == 4


def test_relabelling_by_a_permutation_is_exact(
    student_and_inputs: tuple[EdgeStudent, torch.Tensor, float],
) -> None:
    # Prepare: a swap 3 ↔ 8 and a cycle 1 → 2 → 5 → 1
    student, x, floor = student_and_inputs
    mapping = np.arange(C)
    mapping[[3, 8, 1, 2, 5]] = [8, 3, 2, 5, 1]
    relabelled = copy.deepcopy(student)

    # Execute
    exact = relabel_head(relabelled, mapping, floor)

    # Assert: every decision is the parent's, relabelled
    assert exact
    np.testing.assert_array_equal(predictions(relabelled, x), mapping[predictions(student, x)])


def test_a_merge_is_not_exact_and_its_source_is_never_chosen(
    student_and_inputs: tuple[EdgeStudent, torch.Tensor, float],
) -> None:
    # Prepare: 3 merges into 8; class 3 then has nothing mapped onto it
    student, x, floor = student_and_inputs
    mapping = np.arange(C)
    mapping[3] = 8
    relabelled = copy.deepcopy(student)

    # Execute
    exact = relabel_head(relabelled, mapping, floor)

    # Assert
    assert not exact
    assert not (predictions(relabelled, x) == 3).any()


def test_relabelling_is_a_recipe_for_any_map_that_moves_a_class() -> None:
    # Prepare
    swap, merge, nothing = knowledge({3: 8, 8: 3}), knowledge({3: 8}), knowledge({})

    # Execute / Assert: re-KD applies to any knowledge; relabelling needs a class the map moves
    assert applies(RELABEL, swap)
    assert applies(RELABEL, merge)
    assert not applies(RELABEL, nothing)
    assert all(applies(recipe, k) for recipe in (REKD, RELABEL_REKD) for k in (swap, merge, nothing))


def test_a_search_is_named_by_its_recipes_in_order() -> None:
    # Execute
    search = search_of("re-KD, relabel")

    # Assert
    assert [r.name for r in search.recipes] == ["re-KD", "relabel"]
    assert [r.name for r in search_of(",".join(RECIPES)).recipes] == list(RECIPES)


@pytest.mark.parametrize("names", ["bogus", "relabel,", "relabel,,re-KD", "RELABEL", ""])
def test_an_unknown_recipe_is_refused_by_name(names: str) -> None:
    with pytest.raises(ValueError, match="unknown RD recipe"):
        search_of(names)
