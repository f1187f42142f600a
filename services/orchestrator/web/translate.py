"""What the web page sends and receives, as plain data: the submit form -> a JobSpec, jobs and events -> JSON.

No HTTP here (that is `web.server`); the gRPC servicer's helpers do the work, so the page and gRPC clients see
the same jobs, checks and errors.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any, Callable

from google.protobuf import json_format
from magic3d.v1 import orchestrator_pb2, scene_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.orchestrator.jobs import JobRecord
from services.orchestrator.servicer import job_to_proto
from shared.errors import InvalidArgument

STAGE_NAMES = {scene_pb2.STAGE_COARSE: "coarse", scene_pb2.STAGE_FINE: "fine"}
STAGE_BY_NAME = {name: stage for stage, name in STAGE_NAMES.items()}
STATE_NAMES = {value: name.removeprefix("JOB_STATE_").lower() for name, value in orchestrator_pb2.JobState.items()}


class SubmitForm(BaseModel):
    """POST /api/jobs (JSON). A prompt, or an image (PNG/JPEG bytes, base64) with an optional prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    preset: str = ""  # empty: the orchestrator's default for the input
    seed: int = Field(default=0, ge=0, lt=2**64)
    image_base64: str = ""
    steps: dict[str, int] = Field(default_factory=dict)  # {"coarse": N, "fine": N}: per-stage step overrides
    request_id: str = Field(default="", max_length=128)


def parse_submit(body: Any) -> SubmitForm:
    """The form, or InvalidArgument naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object", "body")
    try:
        return SubmitForm.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidArgument(first["msg"], field) from None


def spec_from_form(form: SubmitForm) -> orchestrator_pb2.JobSpec:
    spec = orchestrator_pb2.JobSpec(preset=form.preset, seed=form.seed)
    if form.image_base64:
        try:
            encoded = base64.b64decode(form.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("not valid base64", "image_base64") from None
        spec.image.encoded = encoded  # decoded and checked (size, format) by the orchestrator's admission
        spec.image.prompt = form.prompt
        spec.image.negative_prompt = form.negative_prompt
    else:
        if not form.prompt.strip():
            raise InvalidArgument("a prompt is required (or an image)", "prompt")
        spec.text.prompt = form.prompt
        spec.text.negative_prompt = form.negative_prompt
    for stage, steps in sorted(form.steps.items()):
        if stage not in STAGE_BY_NAME:
            raise InvalidArgument(f"unknown stage {stage!r}; known: {sorted(STAGE_BY_NAME)}", f"steps.{stage}")
        override = spec.overrides.add(steps=steps)
        override.config.stage = STAGE_BY_NAME[stage]
    return spec


def submit_request(form: SubmitForm) -> orchestrator_pb2.SubmitJobRequest:
    return orchestrator_pb2.SubmitJobRequest(spec=spec_from_form(form), request_id=form.request_id or uuid.uuid4().hex)


def artifact_url(job_id: str, name: str) -> str:
    return f"/api/jobs/{job_id}/artifacts/{name}"


def job_json(record: JobRecord) -> dict[str, Any]:
    job = job_to_proto(record, brief=True)
    spec = job.spec
    kind = spec.WhichOneof("input") or ""
    prompt = getattr(spec, kind).prompt if kind else ""
    return {
        "id": record.job_id,
        "name": job.name,
        "state": STATE_NAMES.get(job.state, "unspecified"),
        "input": kind,
        "prompt": prompt,
        "preset": spec.preset,
        "stage": STAGE_NAMES.get(job.stage, ""),
        "step": job.step,
        "total_steps": job.total_steps,
        "error": job.error,
        "create_time": record.create_time,
        "update_time": record.update_time,
        "artifacts": [{"kind": a.kind, "url": artifact_url(record.job_id, a.kind)} for a in job.artifacts],
    }


def event_json(job_id: str, event: orchestrator_pb2.JobEvent, preview_name: Callable[[str], str | None]) -> dict:
    """One job event as the page reads it: {"type": "progress", "stage": "coarse", "step": 3, ...}. Store links
    become this server's artifact URLs (`preview_name` maps a preview's store link to its name in the job)."""
    kind = event.WhichOneof("event") or "unknown"
    body = getattr(event, kind) if kind != "unknown" else None
    data: dict[str, Any] = {"type": kind, "job": job_id}
    if body is not None:
        data.update(json_format.MessageToDict(body, preserving_proto_field_name=True))
    # MessageToDict leaves out zeros (step 0, an ETA of 0 s at a stage's last step) and writes int64 as strings
    for name in ("stage", "step", "total_steps"):
        if body is not None and name in body.DESCRIPTOR.fields_by_name:
            value = getattr(body, name)
            data[name] = STAGE_NAMES.get(value, "") if name == "stage" else int(value)
    if kind == "progress" and event.progress.losses:  # a step's report (a preview's has no losses and no ETA)
        data["eta_seconds"] = event.progress.eta_seconds
    if kind == "progress" and event.progress.preview_uri:
        name = preview_name(event.progress.preview_uri)
        data.pop("preview_uri", None)
        if name:
            data["preview_url"] = artifact_url(job_id, name)
    if kind == "done":
        data["artifacts"] = [{"kind": a.kind, "url": artifact_url(job_id, a.kind)} for a in event.done.artifacts]
    data.pop("checkpoint_uri", None)  # store links are not for the page
    return data
