"""Where a job's files live in the artifact store, and the names they have in its artifact map: one place for both
the scene service (checkpoints, exports) and the orchestrator (provenance, previews). Everything of a job lies
under `job_prefix`, which is what deleting the job removes. Torch-free."""

from __future__ import annotations

# Names in a job's artifact map (JobRecord.artifacts, the Artifact kinds a client sees).
PROVENANCE = "provenance.json"
MESHES = ("model.glb", "model.obj")  # an exported job has at least one of these
INPUT_IMAGE = "input.png"  # an image job's input as given (decoded, stored as PNG)
REFERENCE_IMAGE = "reference.png"  # its reference view as the scene fits it (matted, recentred: RGBA)


def stage_checkpoint(stage: str) -> str:
    """The artifact name of a finished stage's final checkpoint ("coarse.ckpt", "fine.ckpt")."""
    return f"{stage}.ckpt"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def checkpoint_key(job_id: str, stage: str, step: int) -> str:
    return f"{job_prefix(job_id)}/{stage}/step-{step:07d}.ckpt"


def export_prefix(job_id: str, stage: str, step: int) -> str:
    """The folder of one export of a stage's scene at `step` (its files keep their own names under it)."""
    return f"{job_prefix(job_id)}/export/{stage}-step-{step:07d}"


def preview_key(job_id: str, stage: str, step: int) -> str:
    return f"{job_prefix(job_id)}/previews/{stage}-{step:07d}.png"


def provenance_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}/{PROVENANCE}"


def input_key(job_id: str, name: str) -> str:
    """An image job's input files (INPUT_IMAGE, REFERENCE_IMAGE)."""
    return f"{job_prefix(job_id)}/input/{name}"


__all__ = [
    "INPUT_IMAGE",
    "MESHES",
    "REFERENCE_IMAGE",
    "PROVENANCE",
    "checkpoint_key",
    "export_prefix",
    "input_key",
    "job_prefix",
    "preview_key",
    "provenance_key",
    "stage_checkpoint",
]
