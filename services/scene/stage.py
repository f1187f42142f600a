"""What every SDS-guided stage is: the step skeleton, checkpoints, and the attributes the server asks for.

`Stage.step()` is the one skeleton: draw cameras from the stage's generator -> `_render` (the stage's own renderer,
laps its phases) -> the priors' summed SDS gradient -> `_regularisers` -> `apply_losses` (backward, optimiser step,
skipped-step accounting) -> `_after_update`. A failure before the update (guidance down, the mesh vanished) rewinds
the generator, so a retry draws the same cameras: a step happens whole or not at all.

Pipelined (`config.pipelined_guidance`, services/scene/pipeline.py): `step(prefetch=True)` still completes one step
per call, but renders the next step while this one's guidance runs on a worker thread, so each update applies the
gradient taken one step earlier. A pipelined step draws its cameras and render jitter from a generator of its own
(`draw_seed`: the stage seed and the number of steps applied or skipped before it), so discarding a rendered step
(its guidance failed, the run ended early: `discard_pending`) needs no rewind, and a retry draws the same cameras; the
stage's generator then serves only what happens after an update (the coarse occupancy grid's refresh). A checkpoint
never holds a step in flight: `state_dict` refuses while one is.

Randomness: a stage draws only from generators it owns, seeded from its config's seed (`init_generator()` for its
networks, `self.generator` for everything a step draws), never from torch's global RNG, which scenes created or
stepped concurrently in one process would interleave.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Self

import torch
from torch import nn

from services.scene.checkpoint import Checkpoint
from services.scene.config import REFERENCE_LOSSES, GuidedStageConfig
from services.scene.guidance import Guidance, PriorInfoCache
from services.scene.latent_encoders import LatentEncoders
from services.scene.pipeline import GuidanceWorker, ParameterShadows, PendingStep, draw_seed
from services.scene.reference import ReferenceTarget, reference_losses
from services.scene.steps import Counters, PhaseTimer, StepReport, apply_losses, guidance_gradient
from shared.cameras import Camera, sample_cameras
from shared.errors import FailedPrecondition


def render_side(cameras: list[Camera]) -> int:
    """The side a step's training cameras were drawn at (`config.render_resolution(step)`, the same for the whole
    batch): what `_render` renders them at, so that a resolution schedule reaches the renderer with the cameras."""
    sides = {(camera.height, camera.width) for camera in cameras}
    if len(sides) != 1 or cameras[0].height != cameras[0].width:
        raise ValueError(f"a step's cameras must share one square size, got {sorted(sides)}")
    return cameras[0].height


class Stage(abc.ABC):
    name: ClassVar[str]  # "coarse" / "fine": checkpoint stage and store paths
    config_type: ClassVar[type[GuidedStageConfig]]
    # The modules whose parameters (with Adam's two moments) a scene's memory budget counts.
    trainable_modules: list[nn.Module]
    # The module whose "albedo" output colours the surface (what an export bakes).
    color_field: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, config: GuidedStageConfig, guidance: Guidance, job_id: str, device: str | torch.device) -> None:
        self.config = config
        self.guidance = guidance
        self.prior_infos = PriorInfoCache(guidance)
        self.job_id = job_id
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.counters = Counters()
        self.reference = None if config.reference is None else ReferenceTarget.from_config(config.reference, self.device)
        # Pipelined mode's state, built at its first step (the subclass builds its optimiser after this).
        self._pending: PendingStep | None = None
        self._shadows: ParameterShadows | None = None
        self._worker: GuidanceWorker | None = None

    def use_latent_encoders(self, encoders: LatentEncoders) -> None:
        """Run the latent priors' encoders from `encoders` (a service's, shared by its scenes so that an encoder is
        built and compiled once per service, not once per job) instead of this stage's own."""
        self.prior_infos.encoders = encoders

    def init_generator(self) -> torch.Generator:
        """A fresh generator for network initialisation, seeded like the step generator (the same numbers the
        global RNG gave after `torch.manual_seed(seed)`), so initial weights depend on the seed alone."""
        return torch.Generator().manual_seed(self.config.seed)

    @property
    def step_count(self) -> int:
        return self.counters.step

    def albedo_fn(self, points: torch.Tensor) -> torch.Tensor:
        """The frozen colour field at world points (N, 3) -> albedo (N, 3) on the CPU, without autograd."""
        with torch.no_grad():
            return self.color_field(points.to(self.device))["albedo"].cpu()

    # -- one optimisation step --------------------------------------------------------------------------------

    def step(self, prefetch: bool = False) -> StepReport:
        """One step. Pipelined (`config.pipelined_guidance`), `prefetch` renders the next step and leaves its
        guidance in flight (pass False on a run's last step, so that nothing is left pending); otherwise ignored."""
        if self.config.pipelined_guidance:
            return self._pipelined_step(prefetch)
        config, step = self.config, self.counters.step
        timer = PhaseTimer(self.device)
        rng_before = self.generator.get_state()
        cameras = sample_cameras(config.cameras, config.batch_size, config.render_resolution(step), self.generator)
        try:
            out = self._render(cameras, timer, self.generator)
            grad, sds_losses = guidance_gradient(
                self.guidance, self.prior_infos, config, self.job_id, out["rgb"], cameras, out["background"], step,
                None if self.reference is None else self.reference.condition,
            )
        except BaseException:
            self.generator.set_state(rng_before)  # the step never happened: a retry draws the same cameras
            raise
        timer.lap("guidance")
        images = out["rgb"]
        terms = {"sds": (images * grad).sum() / images.shape[0]}  # d/d(images) = grad / B: the SDS surrogate
        terms |= self._regularisers(out, step)
        terms |= self._reference_terms(out, step, timer, self.generator)
        return apply_losses(
            self.optimizer, self.counters, config.max_nonfinite_steps, step, terms, config.weight, sds_losses, timer,
            after_update=self._after_update,
        )

    # -- pipelined steps (services/scene/pipeline.py) ------------------------------------------------------------

    @property
    def step_in_flight(self) -> bool:
        """Whether a rendered step waits for its guidance (pipelined mode, after `step(prefetch=True)`)."""
        return self._pending is not None

    def discard_pending(self) -> None:
        """Drops the step in flight, if any, as if it had never been drawn (its guidance's result, if it comes, is
        ignored). What a run that ends early (cancelled, drained, failed) calls before the stage is used otherwise."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.future is not None:
            GuidanceWorker.settle(pending.future)
        assert self._shadows is not None
        self._shadows.release(pending.shadow)

    def _pipelined_step(self, prefetch: bool) -> StepReport:
        timer = PhaseTimer(self.device)
        if self._pending is None:  # the pipeline starts: this step is rendered from the current parameters
            self._pending = self._render_pending(self.counters.step, self._draws_done(), timer)
            self._submit_guidance(self._pending)
        current, upcoming, shadows = self._pending, None, self._shadows
        assert current.future is not None and self._worker is not None and shadows is not None
        try:
            if prefetch:  # from the parameters this step's update has not reached yet: the staleness
                upcoming = self._render_pending(self.counters.step + 1, current.draw + 1, timer)
            grad, sds_losses = self._worker.result(current.future)
        except BaseException:
            if upcoming is not None:
                shadows.release(upcoming.shadow)
            self.discard_pending()  # neither step happened: their draws are by index, nothing to rewind
            raise
        timer.lap("guidance")
        self._pending = upcoming
        if upcoming is not None:
            self._submit_guidance(upcoming)
        try:
            images = current.out["rgb"]
            terms = {"sds": (images * grad).sum() / images.shape[0]} | current.terms
            return apply_losses(
                self.optimizer, self.counters, self.config.max_nonfinite_steps, self.counters.step, terms,
                self.config.weight, sds_losses, timer, after_update=self._after_update,
                after_backward=lambda: shadows.move_grads(current.shadow),
            )
        finally:
            shadows.release(current.shadow)

    def _draws_done(self) -> int:
        """Steps drawn and kept so far (applied or skipped as non-finite): the next step's draw index."""
        return self.counters.step + self.counters.skipped_total

    def _render_pending(self, step: int, draw: int, timer: PhaseTimer) -> PendingStep:
        """Draws step `step`'s cameras from its own generator and renders it, with its regularisers and reference
        terms, from a shadow copy of the current parameters."""
        if self._shadows is None:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            self._shadows = ParameterShadows(self._state_modules().values(), parameters)
        config = self.config
        generator = torch.Generator().manual_seed(draw_seed(config.seed, draw))
        cameras = sample_cameras(config.cameras, config.batch_size, config.render_resolution(step), generator)
        shadow = self._shadows.acquire()
        try:
            with self._shadows.swapped_in(shadow):
                out = self._render(cameras, timer, generator)
                terms = self._regularisers(out, step) | self._reference_terms(out, step, timer, generator)
        except BaseException:
            self._shadows.release(shadow)
            raise
        return PendingStep(step=step, draw=draw, cameras=cameras, out=out, terms=terms, shadow=shadow)

    def _submit_guidance(self, pending: PendingStep) -> None:
        if self._worker is None:
            self._worker = GuidanceWorker(self.device)
        config, job_id, step, cameras = self.config, self.job_id, pending.step, pending.cameras
        # Detached: the worker thread reads the pixels only, never the graph.
        images, backgrounds = pending.out["rgb"].detach(), pending.out["background"].detach()
        reference = None if self.reference is None else self.reference.condition
        pending.future = self._worker.submit(lambda: guidance_gradient(
            self.guidance, self.prior_infos, config, job_id, images, cameras, backgrounds, step, reference,
        ))

    @abc.abstractmethod
    def _render(self, cameras: list[Camera], timer: PhaseTimer, generator: torch.Generator) -> dict:
        """Training renders of `cameras` (autograd on) at their own size (`render_side`: the step's
        `config.render_resolution`): at least "rgb" (B, 3, H, W) and "background"; laps its
        phases on `timer`, draws any randomness from `generator`. Raises (before any update) when nothing can be
        rendered. Reads the parameters through the modules' attributes (pipelined steps swap in copies)."""

    @abc.abstractmethod
    def _regularisers(self, out: dict, step: int) -> dict[str, torch.Tensor]:
        """The stage's loss terms besides "sds", from `_render`'s output."""

    def _reference_terms(
        self, out: dict, step: int, timer: PhaseTimer, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The reference-view losses (services.scene.reference) on the steps that render the reference view; only
        the terms with a positive weight at `step` are computed."""
        reference = self.config.reference
        if self.reference is None or reference is None or not reference.due(step):
            return {}
        weighted = {name for name in REFERENCE_LOSSES if self.config.weight(name, step) > 0}
        if not weighted:
            return {}
        render = self._render_reference(out, self.reference, "ref_depth" in weighted, generator)
        losses = reference_losses(render, self.reference, with_depth="ref_depth" in weighted)
        timer.lap("reference")
        return {name: value for name, value in losses.items() if name in weighted}

    @abc.abstractmethod
    def _render_reference(
        self, out: dict, target: ReferenceTarget, with_depth: bool, generator: torch.Generator
    ) -> dict:
        """(`out`: this step's `_render` output; `generator`: its randomness.) A training render (autograd on) of the reference camera at the reference image's resolution: "rgb",
        "opacity", "background" (1, C, S, S) and, `with_depth`, "depth"."""

    def _after_update(self, completed: int) -> None:
        """Called after each optimiser step with the number of steps completed."""

    # -- evaluation -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def render_views(self, cameras: list[Camera], resolution: int | None = None) -> torch.Tensor:
        """Deterministic renders (N, 3, H, W) in [0, 1], row 0 = top."""

    @abc.abstractmethod
    def extract_mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current surface: (vertices (V, 3) world, faces (F, 3)), outward-wound."""

    # -- checkpoints ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _state_modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint holds, by their key in the state (the on-disk names: do not rename)."""

    def state_dict(self) -> dict:
        if self._pending is not None:
            raise RuntimeError("a pipelined step is in flight: discard_pending() before taking the stage's state")
        return {name: module.state_dict() for name, module in self._state_modules().items()} | {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "counters": dataclasses.asdict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.discard_pending()
        for name, module in self._state_modules().items():
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.counters = Counters(**state["counters"])

    def to_checkpoint(self) -> Checkpoint:
        return Checkpoint(stage=self.name, config_json=self.config.model_dump_json(), state=self.state_dict())

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, guidance: Guidance, job_id: str, device: str | torch.device = "cpu"
    ) -> Self:
        if checkpoint.stage != cls.name:
            raise FailedPrecondition(f"checkpoint is of stage {checkpoint.stage!r}, not {cls.name!r}", "checkpoint")
        stage = cls(cls.config_type.model_validate_json(checkpoint.config_json), guidance, job_id, device)
        stage.load_state_dict(checkpoint.state)
        return stage
