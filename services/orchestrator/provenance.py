"""A job's provenance record (provenance.json): what was asked (input, prompts, preset, overrides, seed), what ran
(the plan, the priors and their checkpoints) and with which code, written once when the job first starts.

An image job's record has an `image` entry (the input's SHA-256, size, how it was matted, the reference camera and
the reference images' digests) and the job keeps its input (`input.png`) and reference view (`reference.png`) as
artifacts. The plan in the record names the reference tensors by digest instead of carrying their bytes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from google.protobuf import json_format
from magic3d.v1 import orchestrator_pb2

from services.orchestrator import presets as presets_module
from services.orchestrator.jobs import JobRecord, JobStore
from services.orchestrator.presets import JobPlan
from shared import artifact_keys
from shared.image_input import decode_image, encode_png
from shared.store import ArtifactStore
from shared.tensor_digest import tensor_sha256


def job_prompt(spec: orchestrator_pb2.JobSpec) -> tuple[str, str]:
    kind = spec.WhichOneof("input")
    if kind == "text":
        return spec.text.prompt, spec.text.negative_prompt
    if kind == "image":
        return spec.image.prompt, spec.image.negative_prompt
    if kind in ("edit", "mesh"):
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
        "plan": _plan_json(plan),
        "image": image_record(spec, plan),
        "code_version": code_version,
        "created": record.create_time,
    }


def input_sha256(image: orchestrator_pb2.ImageInput) -> str:
    """The input as sent: SHA-256 of the encoded bytes, or of the tensor (shared.tensor_digest)."""
    return hashlib.sha256(image.encoded).hexdigest() if image.encoded else tensor_sha256(image.image)


def image_record(spec: orchestrator_pb2.JobSpec, plan: JobPlan) -> dict | None:
    if not spec.HasField("image"):
        return None
    image = spec.image
    first = plan.stages[0].config.reference
    return {
        "sha256": input_sha256(image),
        "encoded": bool(image.encoded),
        "segmenter": image.segmenter or "threshold",
        "depth_sha256": tensor_sha256(image.depth) if image.HasField("depth") else None,
        "camera": {
            "azimuth_deg": 0.0, "elevation_deg": first.camera.pose.elevation_deg,
            "distance": first.camera.pose.distance, "fovy_deg": first.camera.intrinsics.fovy_deg,
        },
        "reference_sha256": {s.name: tensor_sha256(s.config.reference.image) for s in plan.stages},
    }


def _plan_json(plan: JobPlan) -> dict:
    """The plan as JSON, the reference views' tensors replaced by their digests (they are artifacts)."""
    document = presets_module.plan_to_json(plan)
    for entry, stage in zip(document["stages"], plan.stages):
        if stage.config.HasField("reference"):
            reference = entry["config"]["reference"]
            for name in ("image", "depth"):
                if stage.config.reference.HasField(name):
                    tensor = getattr(stage.config.reference, name)
                    reference[name] = {"shape": list(tensor.shape), "sha256": tensor_sha256(tensor)}
    return document


def write_inputs(store: ArtifactStore, job_id: str, spec: orchestrator_pb2.JobSpec, plan: JobPlan) -> dict[str, str]:
    """An image job's input and (first stage's) reference view as PNGs; {artifact name: stored URI}."""
    if not spec.HasField("image"):
        return {}
    source, _ = decode_image(spec.image)
    reference = plan.stages[0].config.reference.image
    rgba = np.frombuffer(reference.data, np.uint8).reshape(tuple(reference.shape))
    uris = {}
    for name, pixels in ((artifact_keys.INPUT_IMAGE, source), (artifact_keys.REFERENCE_IMAGE, rgba)):
        key = artifact_keys.input_key(job_id, name)
        store.put(key, encode_png(pixels), "image/png")
        uris[name] = store.canonical_uri(key)
    return uris


def write_provenance(
    jobs: JobStore, store: ArtifactStore, record: JobRecord, spec: orchestrator_pb2.JobSpec, plan: JobPlan,
    code_version: str,
) -> JobRecord:
    """Stores the record (and an image job's input images) and names them in the job's artifacts; returns the
    updated job."""
    inputs = write_inputs(store, record.job_id, spec, plan)
    key = artifact_keys.provenance_key(record.job_id)
    document = provenance_record(record, spec, plan, code_version)
    store.put(key, json.dumps(document, indent=2).encode(), "application/json")
    uri = store.canonical_uri(key)  # the job table keeps stable names; links are minted per request
    return jobs.update(
        record.job_id, provenance_uri=uri, artifacts={**record.artifacts, **inputs, artifact_keys.PROVENANCE: uri}
    )


__all__ = ["image_record", "input_sha256", "job_prompt", "provenance_record", "write_inputs", "write_provenance"]
