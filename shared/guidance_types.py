"""The torch-free part of the guidance contract: how SDS weights a timestep (named per prior term by the stage
configs) and a prompt check's answer, with their proto forms. The stage configs and the orchestrator, which
validates jobs and checks prompts without torch, use these; shared/guidance_api.py (the whole
contract, with torch) re-exports them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from magic3d.v1 import guidance_pb2


class Weighting(str, Enum):
    SDS = "sds"  # w = 1 - abar_t
    UNIFORM = "uniform"  # w = 1
    FANTASIA3D = "fantasia3d"  # w = sqrt(abar_t) * (1 - abar_t)


WEIGHTING_TO_PROTO = {
    Weighting.SDS: guidance_pb2.WEIGHTING_SDS,
    Weighting.UNIFORM: guidance_pb2.WEIGHTING_UNIFORM,
    Weighting.FANTASIA3D: guidance_pb2.WEIGHTING_FANTASIA3D,
}
WEIGHTING_FROM_PROTO: dict[int, Weighting] = {v: k for k, v in WEIGHTING_TO_PROTO.items()}


def weighting_from_proto(value: int) -> Weighting | None:
    """A magic3d.v1 Weighting as the enum; None for WEIGHTING_UNSPECIFIED (or a value this side does not know)."""
    return WEIGHTING_FROM_PROTO.get(value)


@dataclass(frozen=True)
class PromptCheck:
    """An accepted prompt's size (mirrors magic3d.v1.CheckPromptResponse).

    `token_count` is the prompt with the longest view suffix appended, as the prior's text encoder counts it;
    `negative_token_count` is 0 for an empty negative prompt. Both are <= `max_tokens`.
    """

    token_count: int
    negative_token_count: int
    max_tokens: int


def prompt_check_from_proto(message: guidance_pb2.CheckPromptResponse) -> PromptCheck:
    return PromptCheck(
        token_count=message.prompt_tokens,
        negative_token_count=message.negative_prompt_tokens,
        max_tokens=message.max_tokens,
    )


__all__ = [
    "Weighting", "WEIGHTING_TO_PROTO", "WEIGHTING_FROM_PROTO", "weighting_from_proto", "PromptCheck",
    "prompt_check_from_proto",
]
