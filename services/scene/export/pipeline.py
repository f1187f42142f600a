"""`export_textured_mesh`: check -> unwrap -> bake -> GLB / OBJ+MTL+PNG -> turntable preview, all in memory.

See the package docstring for the conventions (axes, scale, centre, uv orientation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.meshes import face_normals
from shared.rasterize import make_rasterizer
from shared.rasterize.base import Rasterizer
from services.scene.export import preview, writers
from services.scene.export.bake import AlbedoFn, BakedTexture, bake_texture
from services.scene.export.check import MeshReport, check_mesh, validate_mesh
from services.scene.export.unwrap import UVAtlas, unwrap

FILE_NAMES = ("model.glb", "model.obj", "model.mtl", "texture.png", "preview.png", "turntable.gif")


@dataclass(frozen=True)
class ExportSettings:
    texture_size: int = 1024  # square texture side in texels
    padding_px: int = 8  # dilation of chart borders, in texels
    preview_views: int = 8  # turntable views (grid and GIF frames)
    preview_resolution: int = 256  # side of one preview view in pixels
    preview_elevation_deg: float = 20.0
    preview_distance: float | None = None  # None: fit the bounding sphere
    preview_fovy_deg: float = 40.0
    preview_shading: bool = True  # headlight Lambertian on top of the texture
    preview_supersample: int = 1  # render k x larger and box-filter (the torch rasteriser does no antialiasing)
    preview_columns: int = 4  # grid columns (8 views -> 4 x 2)
    gif_frame_ms: int = 120
    center: bool = False  # files only: move the bounding-box centre to the origin
    normalize_radius: float | None = None  # files only: scale so the farthest vertex from the centre is this
    max_chunk_faces: int = 5000  # unwrapping works on spatial chunks of at most this many faces
    albedo_chunk: int = 65536  # points per albedo_fn call

    def __post_init__(self) -> None:
        problems = []
        if not 16 <= self.texture_size <= 8192:
            problems.append(f"texture_size must be in [16, 8192], got {self.texture_size}")
        if self.padding_px < 0:
            problems.append(f"padding_px must be >= 0, got {self.padding_px}")
        if self.preview_views < 1:
            problems.append(f"preview_views must be >= 1, got {self.preview_views}")
        if not 16 <= self.preview_resolution <= 4096:
            problems.append(f"preview_resolution must be in [16, 4096], got {self.preview_resolution}")
        if not -90.0 < self.preview_elevation_deg < 90.0:
            problems.append("preview_elevation_deg must be in (-90, 90)")
        if self.preview_distance is not None and not self.preview_distance > 0:
            problems.append("preview_distance must be > 0")
        if not 0.0 < self.preview_fovy_deg < 180.0:
            problems.append("preview_fovy_deg must be in (0, 180)")
        if self.preview_supersample < 1 or self.preview_columns < 1 or self.gif_frame_ms < 1:
            problems.append("preview_supersample, preview_columns and gif_frame_ms must be >= 1")
        if self.normalize_radius is not None and not self.normalize_radius > 0:
            problems.append("normalize_radius must be > 0")
        if self.max_chunk_faces < 64 or self.albedo_chunk < 1:
            problems.append("max_chunk_faces must be >= 64 and albedo_chunk >= 1")
        if problems:
            raise ValueError("invalid ExportSettings: " + "; ".join(problems))


@dataclass
class ExportedMesh:
    files: dict[str, bytes]  # exactly FILE_NAMES
    report: MeshReport  # of the mesh as given (before unwrapping)
    faces: int
    uv_vertices: int  # vertices after splitting at chart seams (the GLB's vertex count)
    charts: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def write_to(self, directory: str | Path) -> dict[str, Path]:
        """Writes every file into `directory` (created if needed); the OBJ finds its MTL and PNG there."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, data in self.files.items():
            paths[name] = directory / name
            paths[name].write_bytes(data)
        return paths


def export_textured_mesh(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    albedo_fn: AlbedoFn,
    settings: ExportSettings = ExportSettings(),
    rasterizer: Rasterizer | None = None,
) -> ExportedMesh:
    """Exports (vertices (V, 3) world +Z up, faces (F, 3)) with a texture baked from albedo_fn(world points).

    albedo_fn sees points in the scene's own world frame (before any axis change, centring or scaling) and must
    return (N, 3) colours in [0, 1] (clamped). Raises ValueError for empty or malformed meshes.
    """
    vertices, faces = validate_mesh(vertices, faces)
    vertices = vertices.detach()  # export is read-only; no graph is kept alive through the bake
    rasterizer = rasterizer or make_rasterizer("torch")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    report = check_mesh(vertices, faces)  # before unwrapping: seams would read as boundaries
    lap("check")
    atlas = unwrap(vertices, faces, settings.texture_size, _pack_padding(settings.padding_px),
                   settings.max_chunk_faces)
    lap("unwrap")
    texture = bake_texture(atlas, vertices, albedo_fn, rasterizer, settings.texture_size, settings.padding_px,
                           settings.albedo_chunk)
    png = writers.encode_png(texture.image)
    lap("bake")
    normals = vertex_normals(vertices, faces)
    files = _model_files(vertices, faces, normals, atlas, png, report, settings)
    lap("write")
    files.update(_preview_files(vertices, normals, atlas, texture, rasterizer, settings))
    lap("preview")
    return ExportedMesh(
        files={name: files[name] for name in FILE_NAMES},
        report=report,
        faces=int(faces.shape[0]),
        uv_vertices=atlas.num_uv_vertices,
        charts=atlas.charts,
        timings=timings,
    )


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) area-weighted smooth normals of the welded mesh (so shading is continuous across uv seams);
    vertices with no area around them get +Z."""
    cross = face_normals(vertices, faces)
    normals = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), cross.repeat_interleave(3, dim=0))
    length = normals.norm(dim=1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=vertices.dtype, device=vertices.device).expand_as(normals)
    return torch.where(length > 1e-20, normals / length.clamp(min=1e-20), up)


def file_transform(vertices: torch.Tensor, settings: ExportSettings) -> tuple[torch.Tensor, float]:
    """(offset (3,), scale): file position = z_up_to_y_up((world + offset) * scale). Identity by default."""
    offset = torch.zeros(3, dtype=vertices.dtype, device=vertices.device)
    if settings.center or settings.normalize_radius is not None:
        low, high = vertices.min(dim=0).values, vertices.max(dim=0).values
        offset = -(low + high) / 2
    scale = 1.0
    if settings.normalize_radius is not None:
        extent = float((vertices + offset).norm(dim=1).max())
        scale = settings.normalize_radius / extent if extent > 0 else 1.0
    return offset, scale


def _pack_padding(padding_px: int) -> int:
    """xatlas gap around each chart: half the dilation (at least 1 texel) so neighbouring charts' padding
    mostly lands in its own gap, without wasting much atlas space."""
    return max(1, padding_px // 2)


def _model_files(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    normals: torch.Tensor,
    atlas: UVAtlas,
    png: bytes,
    report: MeshReport,
    settings: ExportSettings,
) -> dict[str, bytes]:
    offset, scale = file_transform(vertices, settings)
    positions = writers.z_up_to_y_up((vertices + offset) * scale).cpu()
    file_normals = writers.z_up_to_y_up(normals).cpu()
    index = atlas.vertex_index
    closed = report.watertight and report.consistently_wound and bool(report.outward)
    extras = {
        "up_axis": "+Y (converted from the scene's +Z up: (x, y, z) -> (x, z, -y))",
        "units": "scene world units",
        "world_offset": offset.tolist(),
        "world_scale": scale,
    }
    glb = writers.glb_bytes(positions.index_select(0, index), file_normals.index_select(0, index), atlas.uvs,
                            atlas.faces, png, double_sided=not closed, extras=extras)
    header = (
        "magic3d textured mesh export; +Y up: world (x, y, z) -> file (x, z, -y); scene world units\n"
        f"world offset {offset.tolist()} then scale {scale} applied before the axis change\n"
        f"{report.num_faces} faces, watertight={report.watertight}, outward={report.outward}"
    )
    obj = writers.obj_text(positions, file_normals, atlas.uvs, faces, atlas.faces, header=header)
    return {
        "model.glb": glb,
        "model.obj": obj.encode("utf-8"),
        "model.mtl": writers.mtl_text().encode("utf-8"),
        "texture.png": png,
    }


def _preview_files(
    vertices: torch.Tensor,
    normals: torch.Tensor,
    atlas: UVAtlas,
    texture: BakedTexture,
    rasterizer: Rasterizer,
    settings: ExportSettings,
) -> dict[str, bytes]:
    device = vertices.device
    index = atlas.vertex_index.to(device)
    frames = preview.render_turntable(
        vertices.index_select(0, index),
        normals.index_select(0, index),
        atlas.uvs.to(device),
        atlas.faces.to(device),
        texture.as_float_raster().to(device),
        rasterizer,
        views=settings.preview_views,
        resolution=settings.preview_resolution,
        elevation_deg=settings.preview_elevation_deg,
        distance=settings.preview_distance,
        fovy_deg=settings.preview_fovy_deg,
        shading=settings.preview_shading,
        supersample=settings.preview_supersample,
    )
    return {
        "preview.png": preview.encode_grid_png(frames, settings.preview_columns),
        "turntable.gif": preview.encode_gif(frames, settings.gif_frame_ms),
    }
