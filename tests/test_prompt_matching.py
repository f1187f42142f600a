"""The analytic prior's prompt matching: singular and plural forms, and prompts naming several objects (refused)."""

from __future__ import annotations

import pytest

from services.guidance import engine
from services.guidance.priors.analytic import (
    AnalyticPrior,
    ReferenceObject,
    builtin_objects,
    named_groups,
    singular_forms,
)
from shared import meshes
from shared.errors import InvalidArgument


@pytest.fixture(scope="module")
def prior():
    mug = ReferenceObject("white mug", meshes.cylinder(0.3, 0.6, segments=8), (0.9, 0.9, 0.9), ("cup", "glass"))
    cherry = ReferenceObject("cherry", meshes.uv_sphere(0.2, segments=8, rings=4), (0.8, 0.0, 0.1))
    return AnalyticPrior(objects=[*builtin_objects(), mug, cherry], resolution=16)


@pytest.mark.parametrize(
    ("word", "singular"),
    [("rings", "ring"), ("boxes", "box"), ("cherries", "cherry"), ("glasses", "glass"), ("toruses", "torus"),
     ("houses", "house"), ("cones", "cone")],
)
def test_singular_forms(word, singular):
    assert {word, singular} <= singular_forms(word)
    assert singular_forms(singular) == {singular} or singular.endswith("s")


@pytest.mark.parametrize("word", ["glass", "has", "ring", "torus"])
def test_words_that_are_no_plural_stay_as_they_are(word):
    assert singular_forms(word) == {word} or word.endswith("us")


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("three stacked rings", "red torus"),
        ("a stacked ring", "red torus"),
        ("two green cubes", "green cube"),
        ("a pile of boxes", "green cube"),
        ("Balls!", "blue sphere"),
        ("a bowl of cherries", "cherry"),
        ("glasses", "white mug"),
        ("a red torus, side view", "red torus"),
    ],
)
def test_plural_and_singular_forms_name_the_same_object(prior, prompt, named):
    assert [prior.objects[i].name for i in prior.named_objects(prompt)] == [named]
    prior.validate_prompt(prompt, "prompt")


@pytest.mark.parametrize(
    ("prompt", "objects"),
    [
        ("a red torus and a blue sphere", ["red torus", "blue sphere"]),
        ("a cone on a box", ["yellow cone", "green cube"]),
        ("a cherry in a cup, front view", ["white mug", "cherry"]),
    ],
)
def test_a_prompt_naming_several_objects_is_refused_naming_them(prior, prompt, objects):
    groups = named_groups(prompt, prior.objects)
    assert sorted(prior.objects[g[0]].name for g in groups) == sorted(objects)
    with pytest.raises(InvalidArgument) as caught:
        engine.check_prompt(prior, prompt)  # what the orchestrator's submit asks the guidance tier
    assert caught.value.field == "prompt" and "several objects" in caught.value.message
    for name in objects:
        assert repr(name) in caught.value.message


def test_negative_prompts_may_name_several_objects(prior):
    engine.check_prompt(prior, "a red torus", negative_prompt="a blue sphere and a green cube")
    assert len(named_groups("a blue sphere and a green cube", prior.objects)) == 2


def test_one_phrase_shared_by_two_objects_is_one_named_set():
    """Two objects answering to the same alias are one conditional set, not 'several objects'."""
    objs = builtin_objects()
    torus = next(o for o in objs if o.name == "red torus")
    prior = AnalyticPrior(objects=[*objs, ReferenceObject("blue torus", torus.mesh, (0.1, 0.2, 0.9), ("torus",))],
                          resolution=16)
    prior.validate_prompt("some tori or a torus", "prompt")
    assert [prior.objects[i].name for i in prior.named_objects("a torus")] == ["red torus", "blue torus"]
    assert [prior.objects[i].name for i in prior.named_objects("two red toruses")] == ["red torus"]
