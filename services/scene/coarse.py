"""The coarse stage as a plain object: `step()`, `state_dict()` / `load_state_dict()`, `extract_mesh()`.

One step: draw cameras -> volume-render B images (keeping the autograd graph) -> ask each prior for SDS gradients
of those images -> back-propagate the weighted gradients plus the regularisers -> optimiser step -> refresh the
occupancy grid when due. A guidance failure raises before anything is updated, and a step whose losses or
gradients are not finite is skipped and counted, so a step either happens whole or not at all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from services.scene.checkpoint import Checkpoint
from services.scene.config import CoarseConfig
from services.scene.field import (
    BackgroundMLP,
    NeuralField,
    OccupancyGrid,
    VolumeRenderer,
    opacity_entropy,
    orientation_loss,
    param_groups,
    sparsity_loss,
)
from services.scene.guidance import Guidance, PriorInfoCache
from services.scene.steps import (
    Counters,
    NonFiniteStepsExceeded,
    PhaseTimer,
    StepReport,
    apply_losses,
    guidance_gradient,
    step_seed,
)
from shared.cameras import Camera, sample_cameras
from shared.errors import FailedPrecondition

__all__ = ["CoarseStage", "NonFiniteStepsExceeded", "StepReport", "step_seed"]


class CoarseStage:
    def __init__(self, config: CoarseConfig, guidance: Guidance, job_id: str, device: str | torch.device = "cpu"):
        self.config = config
        self.guidance = guidance
        self.prior_infos = PriorInfoCache(guidance)
        self.job_id = job_id
        self.device = torch.device(device)
        torch.manual_seed(config.seed)  # network initialisation only; every later draw uses self.generator
        self.field = NeuralField(config.field).to(self.device)
        self.background = BackgroundMLP().to(self.device)
        self.occupancy = OccupancyGrid(config.occupancy).to(self.device)
        self.renderer = VolumeRenderer(config.renderer)
        self.optimizer = torch.optim.Adam(
            param_groups(self.field, self.background, config.learning_rate, config.background_learning_rate),
            betas=(0.9, 0.99),
            eps=1e-15,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.counters = Counters()

    @property
    def step_count(self) -> int:
        return self.counters.step

    # -- one optimisation step --------------------------------------------------------------------------------

    def step(self) -> StepReport:
        config, step = self.config, self.counters.step
        timer = PhaseTimer(self.device)
        lap = timer.lap
        rng_before = self.generator.get_state()
        cameras = sample_cameras(config.cameras, config.batch_size, config.resolution, self.generator)
        self.field.train()
        out = self.renderer.render(
            self.field, self.background, cameras, config.resolution, generator=self.generator, occupancy=self.occupancy
        )
        images = out["rgb"]
        lap("render")
        try:
            grad, sds_losses = guidance_gradient(
                self.guidance, self.prior_infos, config, self.job_id, images, cameras, out["background"], step
            )
        except BaseException:
            self.generator.set_state(rng_before)  # the step never happened: a retry draws the same cameras
            raise
        lap("guidance")

        batch = images.shape[0]
        terms = {"sds": (images * grad).sum() / batch}  # d/d(images) = grad / B: the SDS surrogate
        if config.weight("orientation", step) > 0 and "normals" in out:
            terms["orientation"] = orientation_loss(out["weights"], out["normals"], out["view_dirs"], out["opacity"])
        terms["sparsity"] = sparsity_loss(out["opacity"])
        terms["opacity_entropy"] = opacity_entropy(out["opacity"])
        return apply_losses(
            self.optimizer, self.counters, config.max_nonfinite_steps, step, terms, config.weight, sds_losses, timer,
            after_update=lambda completed: self.occupancy.update(self.field, completed, generator=self.generator),
        )

    # -- evaluation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def render_views(self, cameras: list[Camera], resolution: int | None = None) -> torch.Tensor:
        """Deterministic renders (no jitter), (N, 3, H, W) in [0, 1]."""
        self.field.eval()
        out = self.renderer.render(
            self.field, self.background, cameras, resolution or self.config.resolution,
            occupancy=self.occupancy, stratified=False,
        )
        return out["rgb"]

    @torch.no_grad()
    def density_grid(self, resolution: int = 96, chunk: int = 1 << 16) -> torch.Tensor:
        """Density at the centres of a resolution^3 grid over the field's box, (R, R, R) indexed [x, y, z]."""
        radius = self.config.field.bound_radius
        axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * radius - radius
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        densities = [self.field.density(p.to(self.device)).cpu() for p in points.split(chunk)]
        return torch.cat(densities).reshape(resolution, resolution, resolution)

    def extract_mesh(self, level: float | None = None, resolution: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
        """Marching cubes of the density at `level`: (vertices (V, 3) world, faces (F, 3)), outward-wound."""
        from skimage.measure import marching_cubes

        level = self.config.isosurface_level if level is None else level
        grid = self.density_grid(resolution).numpy()
        if not grid.min() < level < grid.max():
            raise FailedPrecondition(
                f"no surface at density level {level}: densities span [{grid.min():.3g}, {grid.max():.3g}]",
                "isosurface_level",
            )
        radius = self.config.field.bound_radius
        spacing = 2 * radius / resolution
        vertices, faces, _, _ = marching_cubes(grid, level=level, spacing=(spacing,) * 3)
        vertices = torch.from_numpy(vertices.copy()).float() - radius + spacing / 2
        faces = torch.from_numpy(faces.astype(np.int64))
        # Density grows inwards, so skimage's triangles face inwards: flip them to wind outwards.
        return vertices, faces[:, [0, 2, 1]]

    def retarget(self, prompt: str, negative_prompt: str = "") -> None:
        """Prompt-based editing (Magic3D): keep the fitted field and optimiser, guide it with a new prompt from
        step 0 (so the stage's schedules start over)."""
        self.config = self.config.model_copy(update={"prompt": prompt, "negative_prompt": negative_prompt})
        self.counters = Counters()

    # -- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "field": self.field.state_dict(),
            "background": self.background.state_dict(),
            "occupancy": self.occupancy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "counters": dataclasses.asdict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.counters = Counters(**state["counters"])

    def to_checkpoint(self) -> Checkpoint:
        return Checkpoint(stage="coarse", config_json=self.config.model_dump_json(), state=self.state_dict())

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, guidance: Guidance, job_id: str, device: str | torch.device = "cpu"
    ) -> "CoarseStage":
        if checkpoint.stage != "coarse":
            raise FailedPrecondition(f"checkpoint is of stage {checkpoint.stage!r}, not 'coarse'", "checkpoint")
        stage = cls(CoarseConfig.model_validate_json(checkpoint.config_json), guidance, job_id, device)
        stage.load_state_dict(checkpoint.state)
        return stage
