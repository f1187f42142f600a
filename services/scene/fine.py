"""The fine stage (a `Stage`; Magic3D's second stage): `from_coarse()`, `from_mesh()`, `extract_mesh()`.

State: a DMTet geometry (SDF and bounded vertex offsets on a run-time tetrahedral grid), the colour field (a copy of
the coarse neural field, read for its albedo only) and the coarse environment-map background.

One step: marching tetrahedra (differentiable) -> rasterise B views at `resolution` -> colour field at the covered
pixels -> shade, composite, antialias -> SDS gradients from the priors -> back-propagate them with the normal-
consistency and Laplacian regularisers -> Adam step (the skeleton is `Stage.step`). As in the coarse stage, a
guidance failure leaves nothing updated and non-finite steps are skipped and counted.

A vanished mesh (the SDF on one side of zero everywhere: no faces to render) is recovered from, up to
`dmtet.vanish_recoveries` times a job: every `dmtet.recovery_snapshot_every` steps a render that found faces keeps a
copy of the geometry's tensors and their Adam state in memory (`GeometrySnapshot`; checkpoints do not hold it); a
vanish restores that copy and halves the SDF and offset learning rates. It is found where it happens, right after
the update that emptied the mesh (`DMTetGeometry.has_surface`, one reduction): that step stays done and `step()`
returns with the geometry restored, so a run's last update cannot leave an empty mesh to an export, a checkpoint or
a resume. A geometry found empty at a render (emptied outside an update, e.g. a checkpoint saved before this check)
is restored the same way and the same step retried with the same cameras. The step counter never goes back (the
colour field and background keep their updates): only the geometry returns to its last healthy state. Pipelined,
the step in flight is dropped (`Stage.discard_pending`) before the restore: it was rendered from parameters the
restore overwrites, or from the vanished geometry itself.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from services.scene.coarse import CoarseStage
from services.scene.config import DMTetConfig, FineConfig
from services.scene.field import BackgroundMLP, NeuralField
from services.scene.guidance import Guidance
from services.scene.mesh import conversion
from services.scene.mesh.dmtet import DMTetGeometry
from services.scene.mesh.tets import marching_tets
from services.scene.mesh.regularizers import laplacian_smoothness, normal_consistency
from services.scene.mesh.renderer import MeshRenderer
from services.scene.mesh.silhouette import soft_silhouette
from services.scene.reference import ReferenceTarget
from services.scene.stage import Stage, render_side
from services.scene.steps import PhaseTimer, StepReport
from shared import logging as project_logging
from shared.cameras import Camera
from shared.errors import FailedPrecondition
from shared.mesh_metrics import winding_number
from shared.rasterize import Rasterizer, make_rasterizer

__all__ = ["FineStage", "ConversionReport", "GeometrySnapshot", "MeshVanished", "make_stage_rasterizer"]

log = project_logging.get_logger(__name__)

# The optimiser's parameter groups that hold the geometry (a recovery halves their learning rates).
GEOMETRY_GROUPS = ("sdf", "deformation")


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    level: float
    level_chosen: bool  # False when the config forced the level
    silhouette_iou: float
    removed_vertices: int  # inside grid vertices dropped as floaters
    faces: int
    candidates: tuple[tuple[float, float], ...] = ()


class MeshVanished(FailedPrecondition):
    """A training render found no faces: the SDF has no zero crossing. `FineStage.step` recovers from it while
    `dmtet.vanish_recoveries` allows; the client sees a plain FailedPrecondition once none remain."""


@dataclasses.dataclass(frozen=True)
class GeometrySnapshot:
    """Copies of the geometry's parameters and of their optimiser state, taken after `updates` updates from
    parameters whose mesh had faces. In host memory, so that it takes none of the scene's GPU memory (which its
    budget counts): at 128 cells about 12 floats a grid vertex, 100 MB, copied every `recovery_snapshot_every` steps.
    """

    updates: int
    values: tuple[torch.Tensor, ...]
    # Each optimiser state entry with the device it goes back to (None: not a tensor).
    optimizer_states: tuple[dict[str, tuple[Any, torch.device | None]], ...]

    @classmethod
    @torch.no_grad()
    def take(cls, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer, updates: int) -> "GeometrySnapshot":
        return cls(
            updates=updates,
            values=tuple(p.detach().to("cpu", copy=True) for p in parameters),
            optimizer_states=tuple(
                {key: _offloaded(value) for key, value in optimizer.state.get(p, {}).items()} for p in parameters
            ),
        )

    @torch.no_grad()
    def restore(self, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Copies the values back in place (the optimiser keeps its references to the parameters); an empty saved
        state (no update yet) leaves Adam to start the moments afresh, as at the first step."""
        for parameter, value, state in zip(parameters, self.values, self.optimizer_states, strict=True):
            parameter.copy_(value)
            parameter.grad = None
            optimizer.state.pop(parameter, None)
            if state:
                optimizer.state[parameter] = {
                    key: value if device is None else value.to(device, copy=True)
                    for key, (value, device) in state.items()
                }


def _offloaded(value: Any) -> tuple[Any, torch.device | None]:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True), value.device
    return value, None


# How the pure-PyTorch rasteriser antialiases the fine stage's renders: every visible silhouette edge ("contour"),
# since at CPU settings the marching-tetrahedra mesh's triangles are smaller than pixels and nvdiffrast's choice
# ("triangle") reaches about 8% of the outline there.
TORCH_EDGE_ANTIALIAS = "contour"


def make_stage_rasterizer(name: str, device: torch.device, antialias: bool = True) -> Rasterizer:
    """'auto' picks nvdiffrast on CUDA and the pure-PyTorch rasteriser elsewhere. With `antialias` the pure-PyTorch
    one blends silhouette edges (`TORCH_EDGE_ANTIALIAS`) as nvdiffrast's `antialias` does: its silhouette
    gradients keep the CPU fine stage's outlines on the prior's; without them the surface drifted outwards
    (BENCHMARKS.md, issue 16 round 3)."""
    if name == "auto":
        name = "nvdiffrast" if device.type == "cuda" else "torch"
    if name == "torch":
        return make_rasterizer(name, edge_antialias=TORCH_EDGE_ANTIALIAS if antialias else None)
    return make_rasterizer(name)


class FineStage(Stage):
    name = "fine"
    config_type = FineConfig
    config: FineConfig

    def __init__(
        self,
        config: FineConfig,
        guidance: Guidance,
        job_id: str,
        device: str | torch.device = "cpu",
        color_field: NeuralField | None = None,
        background: BackgroundMLP | None = None,
    ) -> None:
        super().__init__(config, guidance, job_id, device)
        init = self.init_generator()
        radius = config.field.bound_radius
        self.geometry = DMTetGeometry(config.dmtet.grid_cells, radius, config.dmtet.max_offset_cells).to(self.device)
        self.color_field = (color_field or NeuralField(config.field, generator=init)).to(self.device)
        self.background = (background or BackgroundMLP(generator=init)).to(self.device)
        self.rasterizer = make_stage_rasterizer(config.rasterizer, self.device, config.antialias)
        self.renderer = MeshRenderer(self.rasterizer, antialias=config.antialias)
        self.optimizer = torch.optim.Adam(
            [
                {"name": "sdf", "params": [self.geometry.sdf], "lr": config.sdf_learning_rate},
                {"name": "deformation", "params": [self.geometry.deformation], "lr": config.deformation_learning_rate},
                {"name": "texture", "params": list(self.color_field.parameters()), "lr": config.texture_learning_rate},
                {"name": "background", "params": list(self.background.parameters()), "lr": config.background_learning_rate},
            ],
            betas=(0.9, 0.99),
            eps=1e-15,
        )
        # The masters, taken before any pipelined render swaps shadow copies into the geometry.
        self._geometry_parameters = list(self.geometry.parameters())
        self._snapshot: GeometrySnapshot | None = None
        self.mesh_recoveries = 0  # restores after a vanished mesh, this job (checkpointed)

    @property
    def trainable_modules(self) -> list[nn.Module]:
        return [self.geometry, self.color_field]

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """The colour field's albedo at world points (N, 3) -> (N, 3) in (0, 1)."""
        return self.color_field(points)["albedo"]

    # -- conversion from the coarse stage ---------------------------------------------------------------------

    @classmethod
    def from_coarse(
        cls, coarse: CoarseStage, config: FineConfig, guidance: Guidance, job_id: str, device: str | torch.device = "cpu"
    ) -> tuple["FineStage", ConversionReport]:
        """A fine stage initialised from a coarse one: SDF from its density, colour field and background copied."""
        config = config.model_copy(update={"field": coarse.config.field})
        stage = cls(
            config, guidance, job_id, device,
            color_field=copy.deepcopy(coarse.field), background=copy.deepcopy(coarse.background),
        )
        report = stage._initialise_sdf(coarse)
        stage.config = config.model_copy(update={"dmtet": config.dmtet.model_copy(update={"level": report.level})})
        return stage, report

    @classmethod
    def from_mesh(
        cls, vertices: torch.Tensor, faces: torch.Tensor, config: FineConfig, guidance: Guidance, job_id: str,
        device: str | torch.device = "cpu",
    ) -> tuple["FineStage", ConversionReport]:
        """A fine stage whose SDF starts from a user's mesh (inside = generalised winding number > 1/2, so open or
        imperfect uploads still work); the colour field and background start fresh."""
        stage = cls(config, guidance, job_id, device)
        report = stage._initialise_sdf_from_mesh(vertices, faces)
        return stage, report

    @torch.no_grad()
    def _initialise_sdf_from_mesh(self, vertices: torch.Tensor, faces: torch.Tensor) -> ConversionReport:
        geometry = self.geometry
        positions, tets = geometry.rest_positions.cpu(), geometry.tets.cpu()
        inside = winding_number(positions, vertices.float(), faces)
        edges = conversion.tet_edges(tets)
        sdf = conversion.sdf_from_density(inside, 0.5, geometry.cells, geometry.cell_size, edges)
        _, surface = marching_tets(positions, sdf, tets)
        if surface.shape[0] == 0:
            raise FailedPrecondition(
                f"the mesh encloses no volume on a {geometry.cells}-cell grid (too thin, or open)", "init_mesh"
            )
        geometry.sdf.copy_(sdf.to(geometry.sdf))
        return ConversionReport(level=0.5, level_chosen=False, silhouette_iou=float("nan"), removed_vertices=0,
                                faces=int(surface.shape[0]))

    @torch.no_grad()
    def _initialise_sdf(self, coarse: CoarseStage) -> ConversionReport:
        settings: DMTetConfig = self.config.dmtet
        geometry = self.geometry
        positions, tets = geometry.rest_positions.cpu(), geometry.tets.cpu()
        coarse.field.eval()
        densities = torch.cat([coarse.field.density(p.to(coarse.device)).cpu() for p in positions.split(1 << 16)])
        if not torch.isfinite(densities).all():
            raise FailedPrecondition("the coarse field's density is not finite on the grid", "init_checkpoint_uri")
        if settings.level is not None:
            choice = conversion.LevelChoice(settings.level, float("nan"), ())
        else:
            cameras = conversion.level_views(self.config.field.bound_radius, settings.level_view_resolution, settings.level_views)
            opacity = coarse.renderer.render(
                coarse.field, None, cameras, settings.level_view_resolution, occupancy=coarse.occupancy, stratified=False
            )["opacity"]
            target = opacity[:, 0].cpu() > 0.5
            choice = conversion.choose_level(
                densities, positions, tets, target, cameras, make_rasterizer("torch"), settings.level_candidates,
                refinements=settings.level_refinements, tolerance=settings.level_tolerance,
            )
        edges = conversion.tet_edges(tets)
        inside = densities > choice.level
        kept = conversion.remove_floaters(inside, edges, settings.min_component_fraction)
        sdf = conversion.sdf_from_density(densities, choice.level, geometry.cells, geometry.cell_size, edges)
        sdf = torch.where(kept, sdf, -sdf.abs())
        _, faces = marching_tets(positions, sdf, tets)
        if faces.shape[0] == 0:
            raise FailedPrecondition(
                f"the coarse field has no surface at density level {choice.level:.4g} "
                f"(densities on the grid span [{float(densities.min()):.3g}, {float(densities.max()):.3g}])",
                "dmtet.level",
            )
        geometry.sdf.copy_(sdf.to(geometry.sdf))
        return ConversionReport(
            level=choice.level,
            level_chosen=settings.level is None,
            silhouette_iou=choice.silhouette_iou,
            removed_vertices=int((inside & ~kept).sum()),
            faces=int(faces.shape[0]),
            candidates=choice.candidates,
        )

    # -- one optimisation step --------------------------------------------------------------------------------

    def step(self, prefetch: bool = False) -> StepReport:
        """`Stage.step`, with the last healthy geometry restored when the mesh has vanished (module doc): right
        after an update that emptied it (`_after_update`; that step stays done), or when a render finds it empty;
        then the step is retried: a failed render leaves nothing updated, the generator rewound and (pipelined)
        nothing in flight, so the retry is the same step with the same cameras."""
        while True:
            try:
                return super().step(prefetch)
            except MeshVanished as vanished:
                self._recover_from(vanished, found_at="render")

    def _after_update(self, completed: int) -> None:
        """Restores the geometry if this update emptied the mesh, so that no step returns with an empty one. One
        reduction over the grid and one host read of it: on CUDA the optimiser phase's lap synchronises right after
        anyway (`PhaseTimer`), so the read adds no stall of its own."""
        if self.geometry.has_surface():
            return
        vanished = MeshVanished(
            f"the mesh vanished at step {completed - 1}: its update left the SDF with no zero crossing", "dmtet"
        )
        self._recover_from(vanished, found_at="update")

    def _recover_from(self, vanished: MeshVanished, found_at: Literal["render", "update"]) -> None:
        """Restores the snapshot, or raises FailedPrecondition when no recovery is left. Either way nothing stays in
        flight: a prefetched step was rendered from parameters the restore overwrites (or that vanished)."""
        self.discard_pending()  # (a failed render already did)
        allowed, snapshot = self.config.dmtet.vanish_recoveries, self._snapshot
        if self.mesh_recoveries >= allowed or snapshot is None:
            if allowed == 0:
                tried = "dmtet.vanish_recoveries is 0: no recovery tried"
            elif snapshot is None:
                tried = f"recoveries tried: {self.mesh_recoveries}; no healthy geometry kept since the start or resume"
            else:
                tried = f"recoveries tried: {self.mesh_recoveries}, the most dmtet.vanish_recoveries allows"
            raise FailedPrecondition(f"{vanished.message} ({tried})", "dmtet.vanish_recoveries") from vanished
        snapshot.restore(self._geometry_parameters, self.optimizer)
        learning_rates = {}
        for group in self.optimizer.param_groups:
            if group["name"] in GEOMETRY_GROUPS:
                group["lr"] /= 2  # a smaller step, lest the same updates take the surface away again
                learning_rates[group["name"]] = group["lr"]
        self.mesh_recoveries += 1
        log.warning("mesh_vanished_recovered", step=self.counters.step, found_at=found_at,
                    recoveries=self.mesh_recoveries, allowed=allowed, snapshot_step=snapshot.updates,
                    learning_rates=learning_rates)

    def _keep_snapshot_if_due(self) -> None:
        """Called by a render that found faces: it was drawn from the current parameters (the masters, or shadow
        copies of them made just before), matching the optimiser's state, in either mode."""
        updates, every = self.counters.step, self.config.dmtet.recovery_snapshot_every
        if self._snapshot is None or updates >= self._snapshot.updates + every:
            self._snapshot = GeometrySnapshot.take(self._geometry_parameters, self.optimizer, updates)

    def _render(self, cameras: list[Camera], timer: PhaseTimer, generator: torch.Generator) -> dict:
        self.color_field.train()
        vertices, faces = self.geometry.surface()
        timer.lap("marching_tets")
        if faces.shape[0] == 0:
            raise MeshVanished(f"the mesh vanished at step {self.counters.step}: the SDF has no zero crossing", "dmtet")
        self._keep_snapshot_if_due()
        out = self.renderer.render(
            vertices, faces, self.albedo, cameras, render_side(cameras), self.background, lap=timer.lap
        )
        timer.lap("shade")
        return out | {"vertices": vertices, "faces": faces}

    def _render_reference(
        self, out: dict, target: ReferenceTarget, with_depth: bool, generator: torch.Generator
    ) -> dict:
        """The reference camera over its own (white) background. The mask compared is the rasterised coverage
        with the soft silhouette's gradient (straight through): the rasteriser's coverage has none w.r.t. the
        vertices."""
        vertices, faces = out["vertices"], out["faces"]
        render = self.renderer.render(vertices, faces, self.albedo, [target.camera], target.resolution, None,
                                      with_depth=with_depth)
        soft = soft_silhouette(vertices, faces, [target.camera], target.resolution)
        return render | {"opacity": render["opacity"].detach() + soft - soft.detach()}

    def _regularisers(self, out: dict, step: int) -> dict[str, torch.Tensor]:
        vertices, faces = out["vertices"], out["faces"]
        return {
            "normal_consistency": normal_consistency(vertices, faces),
            "laplacian": laplacian_smoothness(vertices, faces, scale=self.geometry.cell_size),
        }

    # -- evaluation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def extract_mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current surface: (vertices (V, 3) world, faces (F, 3)), outward-wound, watertight."""
        vertices, faces = self.geometry.surface()
        return vertices.detach().cpu(), faces.cpu()

    @torch.no_grad()
    def render_views(self, cameras: list[Camera], resolution: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] with each camera's shading and background (row 0 = top)."""
        self.color_field.eval()
        vertices, faces = self.geometry.surface()
        if faces.shape[0] == 0:
            raise FailedPrecondition("the mesh is empty: nothing to render", "scene_id")
        out = self.renderer.render(
            vertices, faces, self.albedo, cameras, resolution or self.config.resolution, self.background
        )
        return out["rgb"].clamp(0.0, 1.0)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _state_modules(self) -> dict[str, nn.Module]:
        return {"geometry": self.geometry, "color_field": self.color_field, "background": self.background}

    def state_dict(self) -> dict:
        """The stage's state and the recoveries used (the snapshot stays out: a resume keeps its own from its first
        render). A top-level key, so a replica that predates it still loads the checkpoint."""
        return super().state_dict() | {"mesh_recoveries": self.mesh_recoveries}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mesh_recoveries = int(state.get("mesh_recoveries", 0))
        self._snapshot = None  # from another trajectory
