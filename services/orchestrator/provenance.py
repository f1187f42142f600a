"""A job's provenance record (provenance.json): what was asked (input, prompts, preset, overrides, seed), what ran
(the plan, the priors and their checkpoints) and with which code, written once when the job first starts."""

from __future__ import annotations

import json

from google.protobuf import json_format
from magic3d.v1 import orchestrator_pb2

from services.orchestrator import presets as presets_module
from services.orchestrator.jobs import JobRecord, JobStore
from services.orchestrator.presets import JobPlan
from shared import artifact_keys
from shared.store import ArtifactStore


def job_prompt(spec: orchestrator_pb2.JobSpec) -> tuple[str, str]:
    kind = spec.WhichOneof("input")
    if kind == "text":
        return spec.text.prompt, spec.text.negative_prompt
    if kind in ("edit", "mesh", "image"):
        return getattr(spec, kind).prompt, ""
    return "", ""


def provenance_record(record: JobRecord, spec: orchestrator_pb2.JobSpec, plan: JobPlan, code_version: str) -> dict:
    prompt, negative = job_prompt(spec)
    return {
        "job_id": record.job_id,
        "input": spec.WhichOneof("input"),
        "prompt": prompt,
        "negative_prompt": negative,
        "edit_of": spec.edit.source_job_id if spec.HasField("edit") else None,
        "preset": plan.preset,
        "overrides": [json_format.MessageToDict(o) for o in spec.overrides],
        "seed": spec.seed,
        "priors": [
            {"stage": s, "prior": p, "checkpoint_id": c or "default"} for s, p, c in presets_module.prior_names(plan)
        ],
        "plan": presets_module.plan_to_json(plan),
        "code_version": code_version,
        "created": record.create_time,
    }


def write_provenance(
    jobs: JobStore, store: ArtifactStore, record: JobRecord, spec: orchestrator_pb2.JobSpec, plan: JobPlan,
    code_version: str,
) -> JobRecord:
    """Stores the record and names it in the job's artifacts; returns the updated job."""
    key = artifact_keys.provenance_key(record.job_id)
    document = provenance_record(record, spec, plan, code_version)
    store.put(key, json.dumps(document, indent=2).encode(), "application/json")
    uri = store.canonical_uri(key)  # the job table keeps stable names; links are minted per request
    return jobs.update(
        record.job_id, provenance_uri=uri, artifacts={**record.artifacts, artifact_keys.PROVENANCE: uri}
    )


__all__ = ["job_prompt", "provenance_record", "write_provenance"]
