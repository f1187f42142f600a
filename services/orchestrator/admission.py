"""Admission: a job is accepted only after its whole plan validates (preset + overrides, scene limits, priors known
to the guidance tier, prompt within every prior's token limit) and while the queue has room; then it is stored in
the job table (idempotently per owner and request id) and the dispatcher is woken."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

from magic3d.v1 import orchestrator_pb2, scene_pb2

from services.orchestrator import image_jobs, validation
from services.orchestrator.events import EventHub
from services.orchestrator.jobs import JobNotFound, JobRecord, JobState, JobStore, RequestIdConflict
from services.orchestrator.presets import JobPlan, PresetBook, plan_job
from services.orchestrator.provenance import job_prompt
from services.orchestrator.scenes import SceneReplicas
from shared import artifact_keys
from shared import logging as project_logging
from shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)

log = project_logging.get_logger(__name__)


class PriorChecker(Protocol):
    def check_prompt(self, prior: str, prompt: str, negative_prompt: str = "", checkpoint_id: str = "",
                     timeout_s: float | None = None): ...


class Admission:
    def __init__(
        self,
        jobs: JobStore,
        replicas: SceneReplicas,
        presets: PresetBook,
        priors: PriorChecker | None,
        events: EventHub,
        queue_size: int,
        on_queued: Callable[[], None],
    ) -> None:
        self.jobs = jobs
        self.replicas = replicas
        self.presets = presets
        self.priors = priors
        self.events = events
        self.queue_size = queue_size
        self.on_queued = on_queued

    def submit(self, spec: orchestrator_pb2.JobSpec, request_id: str = "", owner: str = "") -> tuple[JobRecord, bool]:
        """Validates the whole request, then stores the job for `owner` (idempotent on the owner's request_id).
        Raises ServiceError."""
        data = spec.SerializeToString(deterministic=True)
        try:
            existing = self.jobs.find_by_request_id(request_id, data, owner=owner)
        except RequestIdConflict as error:
            raise InvalidArgument(str(error), "request_id") from None
        if existing is not None:  # a retried submit: the job it made, whatever the queue looks like now
            return existing, False
        self.validate(spec)
        queued = self.jobs.counts()[JobState.QUEUED]
        if queued >= self.queue_size:
            raise ResourceExhausted(
                f"{queued} jobs are queued, the most this orchestrator accepts; retry later", retry_after_s=60.0
            )
        try:
            record, created = self.jobs.create(data, request_id, owner=owner)
        except RequestIdConflict as error:  # raced with another submit of the same request_id
            raise InvalidArgument(str(error), "request_id") from None
        if created:
            position = self.jobs.queue_position(record.job_id)
            self.events.publish(record.job_id, orchestrator_pb2.JobEvent(queued=orchestrator_pb2.JobQueued(position=position)))
            log.info("job_submitted", job_id=record.job_id, queue_position=position)
            self.on_queued()
        return record, created

    def validate(self, spec: orchestrator_pb2.JobSpec) -> JobPlan:
        """Everything checkable before work starts; raises InvalidArgument / NotFound / FailedPrecondition / ..."""
        kind = spec.WhichOneof("input")
        if kind is None:
            raise InvalidArgument("give one input: text, image, edit or mesh", "spec.input")
        prompt, negative = job_prompt(spec)
        if not prompt.strip() and kind != "image":  # an image job's prompt is optional (the 2D prior's)
            raise InvalidArgument("the prompt must not be empty or blank", f"spec.{kind}.prompt")
        validation.validate_spec(self, spec)  # deadline well-formed, stage numbers, scene limits, mesh
        if spec.HasField("deadline") and spec.deadline.ToDatetime().timestamp() <= time.time():
            raise InvalidArgument("the deadline has already passed", "spec.deadline")
        if kind == "edit":
            self.edit_source(spec.edit.source_job_id)
        if kind == "mesh":
            validation.read_mesh(spec.mesh)
        plan = self.plan(spec)
        self._check_priors(plan, prompt, negative, kind)
        return plan

    def plan(self, spec: orchestrator_pb2.JobSpec) -> JobPlan:
        prompt, negative = job_prompt(spec)
        kind = spec.WhichOneof("input")
        preset = spec.preset or (self.presets.default_image if kind == "image" else "")
        plan = plan_job(self.presets, preset, spec.overrides, prompt.strip(), negative, spec.seed)
        if kind == "image":
            return image_jobs.plan_image_job(plan, spec.image, spec.overrides)
        image_jobs.check_text_plan(plan, spec.overrides, kind or "text")
        if kind == "mesh":  # the user's mesh is the fine stage's start: no coarse stage
            fine = plan.stage("fine")
            if fine is None:
                raise InvalidArgument(f"preset {plan.preset!r} has no fine stage to refine a mesh", "spec.preset")
            plan = dataclasses.replace(plan, stages=(fine,))
        return plan

    def edit_source(self, source_job_id: str) -> JobRecord:
        try:
            source = self.jobs.get(source_job_id.removeprefix("jobs/"))
        except JobNotFound:
            raise NotFound(f"no job {source_job_id!r} to edit", "spec.edit.source_job_id") from None
        if artifact_keys.stage_checkpoint("coarse") not in source.artifacts:
            raise FailedPrecondition(
                f"job {source.job_id} has no finished coarse stage to edit", "spec.edit.source_job_id"
            )
        return source

    def _check_priors(self, plan: JobPlan, prompt: str, negative: str, kind: str) -> None:
        if self.priors is None:
            return
        for stage in plan.stages:
            for index, term in enumerate(stage.config.priors):
                image_input = term.input == scene_pb2.PRIOR_INPUT_IMAGE
                try:
                    if image_input:  # conditioned on the image, not the prompt: only the prior must exist
                        self._check_prior_exists(term)
                    else:
                        self.priors.check_prompt(term.prior, stage.config.prompt or prompt, negative, term.checkpoint_id)
                except ServiceError as error:
                    if error.field in ("prior", "checkpoint_id"):
                        raise InvalidArgument(
                            f"{error.message} (stage {stage.name})", f"{stage.name}.priors[{index}].{error.field}"
                        ) from None
                    if error.field in ("prompt", "negative_prompt"):
                        field = f"spec.{kind}.{error.field}" if kind in ("text", "image") else f"spec.{kind}.prompt"
                        raise InvalidArgument(f"{error.message} (prior {term.prior!r})", field) from None
                    raise

    def _check_prior_exists(self, term: scene_pb2.PriorTerm) -> None:
        """CheckPrompt resolves the prior and checkpoint (NOT_FOUND naming them) before it judges the prompt, so an
        empty prompt's refusal (INVALID_ARGUMENT on `prompt`) tells that the prior is there."""
        try:
            self.priors.check_prompt(term.prior, "", "", term.checkpoint_id)
        except ServiceError as error:
            if error.field not in ("prompt", "negative_prompt"):
                raise


__all__ = ["Admission", "PriorChecker"]
