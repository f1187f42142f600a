"""A stage's randomness is its own: scenes created and stepped in one process (CreateScene calls run concurrently)
get the results they would get alone, and torch's global RNG is neither read nor changed."""

from __future__ import annotations

import pytest
import torch

from services.scene.coarse import CoarseStage
from services.scene.field import field as field_module
from services.scene.fine import FineStage

from scenes import analytic_guidance
from test_coarse_stage import tiny_config
from test_fine_stage import TINY_FINE, tiny_coarse


@pytest.fixture(scope="module")
def guidance():
    guidance = analytic_guidance(16)
    yield guidance
    guidance.close()


def state(stage: CoarseStage) -> list[torch.Tensor]:
    modules = (stage.field, stage.background, stage.occupancy)
    return [t.detach().clone() for module in modules for t in module.state_dict().values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def other_scene_uses_the_global_rng() -> None:
    """What another scene's thread may do at any moment: reseed and draw from the global RNG."""
    torch.manual_seed(12345)
    torch.rand(100)


def test_interleaved_stages_match_each_run_alone(guidance, monkeypatch):
    alone = CoarseStage(tiny_config(), guidance, "alone")
    alone_reports = [alone.step().losses for _ in range(3)]

    # Another scene's CreateScene touches the global RNG in the middle of building the networks.
    build = field_module.make_encoding

    def interfering_make_encoding(*args, **kwargs):
        encoding = build(*args, **kwargs)
        other_scene_uses_the_global_rng()
        return encoding

    monkeypatch.setattr(field_module, "make_encoding", interfering_make_encoding)
    first = CoarseStage(tiny_config(), guidance, "first")
    other = CoarseStage(tiny_config(seed=11), guidance, "other")
    second = CoarseStage(tiny_config(), guidance, "second")
    reports = {id(first): [], id(second): []}
    for _ in range(3):
        for stage in (first, other, second):
            other_scene_uses_the_global_rng()
            report = stage.step()
            if stage is not other:
                reports[id(stage)].append(report.losses)

    for stage in (first, second):
        assert reports[id(stage)] == alone_reports
        assert same(state(stage), state(alone))
    assert not same(state(other), state(alone))  # a different seed does give another scene


def test_stages_leave_the_global_rng_alone(guidance):
    coarse = tiny_coarse()  # built before the check: it is the fine stage's input, not under test
    torch.manual_seed(7)
    before = torch.get_rng_state()
    stage = CoarseStage(tiny_config(), guidance, "coarse")
    stage.step()
    fine, _ = FineStage.from_coarse(coarse, TINY_FINE.model_copy(update={"resolution": 16}), guidance, "fine")
    fine.step()
    FineStage(TINY_FINE, guidance, "fresh")  # builds its own colour field and background
    assert torch.equal(torch.get_rng_state(), before)
