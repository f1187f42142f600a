"""The coarse stage (a `Stage`): a neural field volume-rendered, `extract_mesh()` by marching cubes.

Its step (`Stage.step`): draw cameras -> volume-render B images (keeping the autograd graph) -> the priors' SDS
gradients -> back-propagate them plus the orientation, sparsity, opacity-entropy and distortion regularisers
-> optimiser step -> refresh the occupancy grid when due.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from services.scene.config import CoarseConfig
from services.scene.field import (
    BackgroundMLP,
    NeuralField,
    OccupancyGrid,
    VolumeRenderer,
    distortion_loss,
    opacity_entropy,
    orientation_loss,
    param_groups,
    sparsity_loss,
)
from services.scene.guidance import Guidance
from services.scene.reference import ReferenceTarget
from services.scene.stage import Stage, render_side
from services.scene.steps import Counters, NonFiniteStepsExceeded, PhaseTimer, StepReport, step_seed
from shared.cameras import Camera
from shared.errors import FailedPrecondition

__all__ = ["CoarseStage", "NonFiniteStepsExceeded", "StepReport", "step_seed"]


class CoarseStage(Stage):
    name = "coarse"
    config_type = CoarseConfig
    config: CoarseConfig

    def __init__(self, config: CoarseConfig, guidance: Guidance, job_id: str, device: str | torch.device = "cpu"):
        super().__init__(config, guidance, job_id, device)
        init = self.init_generator()
        self.field = NeuralField(config.field, generator=init).to(self.device)
        self.background = BackgroundMLP(generator=init).to(self.device)
        self.occupancy = OccupancyGrid(config.occupancy).to(self.device)
        self.renderer = VolumeRenderer(config.renderer)
        self.optimizer = torch.optim.Adam(
            param_groups(self.field, self.background, config.learning_rate, config.background_learning_rate),
            betas=(0.9, 0.99),
            eps=1e-15,
        )

    @property
    def trainable_modules(self) -> list[nn.Module]:
        return [self.field]

    @property
    def color_field(self) -> NeuralField:
        return self.field

    # -- one optimisation step --------------------------------------------------------------------------------

    def _render(self, cameras: list[Camera], timer: PhaseTimer, generator: torch.Generator) -> dict:
        self.field.train()
        out = self.renderer.render(
            self.field, self.background, cameras, render_side(cameras), generator=generator,
            occupancy=self.occupancy,
        )
        timer.lap("render")
        return out

    def _render_reference(
        self, out: dict, target: ReferenceTarget, with_depth: bool, generator: torch.Generator
    ) -> dict:
        # The camera's own (white) background: the input image is composited over the same.
        return self.renderer.render(
            self.field, None, [target.camera], target.resolution, generator=generator, occupancy=self.occupancy,
        )

    def _regularisers(self, out: dict, step: int) -> dict[str, torch.Tensor]:
        terms = {}
        if self.config.weight("orientation", step) > 0 and "normals" in out:
            terms["orientation"] = orientation_loss(out["weights"], out["normals"], out["view_dirs"], out["opacity"])
        terms["sparsity"] = sparsity_loss(out["opacity"])
        terms["opacity_entropy"] = opacity_entropy(out["opacity"])
        if self.config.weight("distortion", step) > 0:
            terms["distortion"] = distortion_loss(
                out["weights"], out["t"], out["delta"], out["ray_indices"], out["opacity"].numel()
            )
        return terms

    def _after_update(self, completed: int) -> None:
        self.occupancy.update(self.field, completed, generator=self.generator)

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
        self.discard_pending()
        self.config = self.config.model_copy(update={"prompt": prompt, "negative_prompt": negative_prompt})
        self.counters = Counters()

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _state_modules(self) -> dict[str, nn.Module]:
        return {"field": self.field, "background": self.background, "occupancy": self.occupancy}
