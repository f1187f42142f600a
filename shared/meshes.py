"""Triangle meshes: a small `Mesh` type, procedural builders, loading through trimesh, normals.

All builders return closed (watertight), consistently outward-wound meshes (counter-clockwise seen from
outside), centred at the origin, +Z up, and fitting inside a sphere of radius about 0.5 with their default
parameters:

* `torus(major_radius=0.32, minor_radius=0.12, segments=48, minor_segments=24)`: ring in the XY plane,
  outer radius 0.44, height 0.24.
* `uv_sphere(radius=0.4, segments=48, rings=24)`: latitude/longitude sphere with single pole vertices.
* `box(size=0.55)`: axis-aligned cube of edge `size` (half-diagonal 0.476), 8 vertices / 12 triangles.
* `cone(radius=0.35, height=0.7, segments=48)`: apex at +height/2, base disk at -height/2.
* `cylinder(radius=0.3, height=0.7, segments=48)`: axis along Z, capped at +-height/2.

Surfaces of revolution (sphere, cone, cylinder, torus) come from one helper that revolves a profile curve
about Z, so their winding is right by construction; the tests check watertightness and positive volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch


@dataclass(frozen=True, eq=False)
class Mesh:
    """vertices (V, 3) float32, faces (F, 3) int64, optional vertex_colors (V, 3) in [0, 1]. Treat as immutable."""

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_colors: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vertices", torch.as_tensor(self.vertices, dtype=torch.float32))
        object.__setattr__(self, "faces", torch.as_tensor(self.faces, dtype=torch.int64))
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"vertices must be (V, 3), got {list(self.vertices.shape)}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be (F, 3), got {list(self.faces.shape)}")
        if self.faces.numel() and (self.faces.min() < 0 or self.faces.max() >= self.vertices.shape[0]):
            raise ValueError("faces index vertices out of range")
        if self.vertex_colors is not None:
            colors = torch.as_tensor(self.vertex_colors, dtype=torch.float32)
            if colors.shape != self.vertices.shape:
                raise ValueError(f"vertex_colors must be (V, 3), got {list(colors.shape)}")
            object.__setattr__(self, "vertex_colors", colors.clamp(0.0, 1.0))

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @cached_property
    def face_normals(self) -> torch.Tensor:
        """(F, 3) unit normals of the faces (right-hand rule on the winding)."""
        return torch.nn.functional.normalize(face_normals(self.vertices, self.faces), dim=1)

    @cached_property
    def shading_normals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-corner normals with 45-degree creases: (normals (3F, 3), normal_tri (F, 3)) for `interpolate`."""
        return crease_normals(self, crease_angle_deg=45.0)

    def to_trimesh(self):
        import trimesh

        colors = None
        if self.vertex_colors is not None:
            colors = (self.vertex_colors.numpy() * 255).round().astype("uint8")
        return trimesh.Trimesh(
            self.vertices.numpy(), self.faces.numpy(), vertex_colors=colors, process=False
        )


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals (F, 3) by the right-hand rule on the winding: twice the area times the unit
    normal. Differentiable w.r.t. the vertices. The one place the project takes this cross product."""
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return torch.linalg.cross(v1 - v0, v2 - v0)


def vertex_normals(mesh: Mesh) -> torch.Tensor:
    """(V, 3) smooth unit normals: the area-weighted mean of the adjacent faces' normals."""
    cross = face_normals(mesh.vertices, mesh.faces)  # length = twice the area
    normals = torch.zeros_like(mesh.vertices)
    normals.index_add_(0, mesh.faces.reshape(-1), cross.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(normals, dim=1)


def crease_normals(
    mesh: Mesh, crease_angle_deg: float = 45.0, vertices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-corner normals that are smooth across edges but keep creases sharper than `crease_angle_deg`.

    Each corner (face f, vertex v) averages (area-weighted) the normals of the faces around v that lie within
    the crease angle of f. Returns (normals (3F, 3), normal_tri (F, 3) = arange(3F).reshape(F, 3)), the
    nvdiffrast way of giving attributes their own index buffer. `vertices` (V, 3) replaces the mesh's own
    positions (differentiably) when given.
    """
    faces = mesh.faces
    num_faces = faces.shape[0]
    verts = mesh.vertices if vertices is None else vertices
    cross = face_normals(verts, faces)
    unit = torch.nn.functional.normalize(cross, dim=1)
    corner_vertex = faces.reshape(-1)  # (3F,)
    device = faces.device  # every index below lives beside the mesh (CPU or CUDA)
    corner_face = torch.arange(num_faces, device=device).repeat_interleave(3)
    order = torch.argsort(corner_vertex, stable=True)
    sorted_vertex = corner_vertex[order]
    counts = torch.bincount(sorted_vertex, minlength=mesh.num_vertices)
    starts = counts.cumsum(0) - counts
    # Every ordered pair of corners sharing a vertex: (corner i, neighbour corner j).
    deg = counts[sorted_vertex]
    left = torch.repeat_interleave(torch.arange(order.numel(), device=device), deg)
    first = torch.repeat_interleave(starts[sorted_vertex], deg)
    offset = torch.arange(left.numel(), device=device) - torch.repeat_interleave(deg.cumsum(0) - deg, deg)
    right = first + offset
    face_i, face_j = corner_face[order[left]], corner_face[order[right]]
    keep = (unit[face_i] * unit[face_j]).sum(1) >= math.cos(math.radians(crease_angle_deg)) - 1e-6
    normals = torch.zeros(3 * num_faces, 3, dtype=cross.dtype, device=cross.device)
    normals = normals.index_add(0, order[left[keep]], cross[face_j[keep]])
    normals = torch.nn.functional.normalize(normals, dim=1)
    return normals, torch.arange(3 * num_faces, device=device).reshape(num_faces, 3)


# ------------------------------------------------------------------ builders
def revolve(profile: list[tuple[float, float]], segments: int, closed: bool = False) -> Mesh:
    """Revolves a (rho, z) profile about +Z. Open profiles must start and end on the axis (rho = 0): those
    become single pole vertices. Walk the profile so that the outside is on the right when going
    top -> bottom along the outer side (then d(profile) x d(phi) points outward)."""
    if segments < 3:
        raise ValueError("segments must be >= 3")
    phi = torch.arange(segments, dtype=torch.float64) * (2 * math.pi / segments)
    if closed:
        ring_profile, top, bottom = profile, None, None
    else:
        if abs(profile[0][0]) > 1e-12 or abs(profile[-1][0]) > 1e-12:
            raise ValueError("an open profile must start and end on the axis")
        ring_profile, top, bottom = profile[1:-1], profile[0], profile[-1]
    rho = torch.tensor([p[0] for p in ring_profile], dtype=torch.float64)[:, None]
    z = torch.tensor([p[1] for p in ring_profile], dtype=torch.float64)[:, None].expand(-1, segments)
    rings = torch.stack([rho * phi.cos(), rho * phi.sin(), z], dim=-1).reshape(-1, 3)
    num_rings = len(ring_profile)
    j = torch.arange(segments)
    jn = (j + 1) % segments
    faces = []
    ring_pairs = num_rings if closed else num_rings - 1
    for i in range(ring_pairs):
        i_next = (i + 1) % num_rings
        a, b = i * segments + j, i_next * segments + j
        c, d = i_next * segments + jn, i * segments + jn
        faces += [torch.stack([a, b, c], 1), torch.stack([a, c, d], 1)]
    vertices = [rings]
    if top is not None and bottom is not None:  # an open profile: its ends become the two poles
        top_index, bottom_index = rings.shape[0], rings.shape[0] + 1
        vertices += [torch.tensor([[0.0, 0.0, top[1]], [0.0, 0.0, bottom[1]]], dtype=torch.float64)]
        last = (num_rings - 1) * segments
        faces += [
            torch.stack([torch.full_like(j, top_index), j, jn], 1),
            torch.stack([last + j, torch.full_like(j, bottom_index), last + jn], 1),
        ]
    return Mesh(torch.cat(vertices).float(), torch.cat(faces))


def torus(
    major_radius: float = 0.32, minor_radius: float = 0.12, segments: int = 48, minor_segments: int = 24
) -> Mesh:
    """Ring about +Z in the XY plane: tube centre at `major_radius`, tube radius `minor_radius`."""
    if not 0 < minor_radius < major_radius:
        raise ValueError("need 0 < minor_radius < major_radius")
    # Clockwise in the (rho, z) plane: down on the outer side, so the normal points away from the tube axis.
    v = [-2 * math.pi * k / minor_segments for k in range(minor_segments)]
    profile = [(major_radius + minor_radius * math.cos(a), minor_radius * math.sin(a)) for a in v]
    return revolve(profile, segments, closed=True)


def uv_sphere(radius: float = 0.4, segments: int = 48, rings: int = 24) -> Mesh:
    """Latitude/longitude sphere: `segments` around Z, `rings` bands from pole to pole."""
    if rings < 2:
        raise ValueError("rings must be >= 2")
    theta = [math.pi * k / rings for k in range(rings + 1)]
    profile = [(radius * math.sin(t), radius * math.cos(t)) for t in theta]
    profile[0], profile[-1] = (0.0, radius), (0.0, -radius)
    return revolve(profile, segments)


def cone(radius: float = 0.35, height: float = 0.7, segments: int = 48) -> Mesh:
    """Apex at z = +height/2, base disk of `radius` at z = -height/2."""
    h = height / 2
    return revolve([(0.0, h), (radius, -h), (0.0, -h)], segments)


def cylinder(radius: float = 0.3, height: float = 0.7, segments: int = 48) -> Mesh:
    """Axis along Z, capped at z = +-height/2."""
    h = height / 2
    return revolve([(0.0, h), (radius, h), (radius, -h), (0.0, -h)], segments)


def box(size: float = 0.55) -> Mesh:
    """Axis-aligned cube of edge `size`, 8 shared corners and 12 triangles."""
    s = size / 2
    corners = torch.tensor(
        [[x, y, z] for x in (-s, s) for y in (-s, s) for z in (-s, s)], dtype=torch.float32
    )  # index = 4 * ix + 2 * iy + iz
    quads = [  # counter-clockwise seen from outside
        (0, 1, 3, 2),  # -x
        (4, 6, 7, 5),  # +x
        (0, 4, 5, 1),  # -y
        (2, 3, 7, 6),  # +y
        (0, 2, 6, 4),  # -z
        (1, 5, 7, 3),  # +z
    ]
    faces = []
    for a, b, c, d in quads:
        faces += [(a, b, c), (a, c, d)]
    return Mesh(corners, torch.tensor(faces))


# ------------------------------------------------------------------- loading
def normalize_mesh(mesh: Mesh, radius: float = 0.5) -> Mesh:
    """Centres the bounding box at the origin and scales uniformly so the farthest vertex is at `radius`."""
    lo, hi = mesh.vertices.min(0).values, mesh.vertices.max(0).values
    centred = mesh.vertices - (lo + hi) / 2
    extent = centred.norm(dim=1).max()
    scale = radius / extent if extent > 0 else 1.0
    return Mesh(centred * scale, mesh.faces, mesh.vertex_colors)


def load_mesh(path: str | Path, up_axis: str = "auto", radius: float = 0.5) -> Mesh:
    """Loads GLB/GLTF/OBJ/PLY (anything trimesh reads) into one `Mesh`, normalised by `normalize_mesh`.

    Scenes are flattened into one mesh. Vertex colours are kept when the file has them (textures are sampled
    to vertex colours where trimesh can). `up_axis`: "z" (or "+z") keeps coordinates; "y" (or "+y") rotates a
    Y-up file to Z-up ((x, y, z) -> (x, -z, y)); "auto" is "y" for glTF files (Y-up by specification) and "z"
    otherwise.
    """
    import numpy as np
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mesh file at {path}")
    loaded = trimesh.load(str(path), force="mesh", process=False)
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise ValueError(f"{path} holds no triangles")
    colors = None
    try:
        visual = loaded.visual
        if isinstance(visual, trimesh.visual.TextureVisuals):
            visual = visual.to_color()
        if isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == "vertex":
            colors = torch.from_numpy(np.asarray(visual.vertex_colors)[:, :3].astype("float32") / 255.0)
    except Exception:  # colours are optional; geometry is what matters
        colors = None
    vertices = torch.from_numpy(np.asarray(loaded.vertices, dtype="float32"))
    faces = torch.from_numpy(np.asarray(loaded.faces, dtype="int64"))
    up = up_axis.lower().removeprefix("+")
    if up == "auto":
        up = "y" if path.suffix.lower() in (".glb", ".gltf") else "z"
    if up == "y":
        vertices = torch.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], dim=1)
    elif up != "z":
        raise ValueError(f"up_axis must be 'auto', '+y' or '+z', got {up_axis!r}")
    if colors is not None and colors.shape[0] != vertices.shape[0]:
        colors = None
    return normalize_mesh(Mesh(vertices, faces, colors), radius)


def load_mesh_bytes(data: bytes, file_format: str, up_axis: str = "y", radius: float = 0.5) -> Mesh:
    """`load_mesh` for uploaded bytes ("glb" or "obj"). Uploads are taken as +Y up (glTF's rule, and what this
    project's own OBJ/GLB exports use), rotated to the scene's +Z up, centred and scaled to `radius`."""
    import tempfile

    suffix = {"glb": ".glb", "obj": ".obj"}.get(file_format.lower())
    if suffix is None:
        raise ValueError(f"unknown mesh format {file_format!r}; known: glb, obj")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        return load_mesh(path, up_axis=up_axis, radius=radius)
