"""Textured-mesh export of the fine stage: a plain library (no service, no GPU needed).

`export_textured_mesh(vertices, faces, albedo_fn)` checks the mesh, unwraps it with xatlas, bakes albedo_fn into
a padded RGB texture through the `Rasterizer` interface, and returns the files in memory:
model.glb (binary glTF 2.0, PBR metallic-roughness, metallic 0, roughness 1, baseColorTexture embedded),
model.obj + model.mtl + texture.png (the OBJ names `model.mtl`, the MTL names `texture.png`, both relative), and a
turntable preview (preview.png grid, turntable.gif).

Conventions of the written files:

* **Axes.** The scene's world is right-handed with +Z up. glTF requires +Y up, and OBJ consumers expect it, so
  both files store (x, y, z)_world as (x, z, -y): a -90 degree rotation about +X, which keeps handedness and
  winding (counter-clockwise seen from outside). To read a file back into the world frame: (x, y, z) -> (x, -z, y)
  (`writers.y_up_to_z_up`; `shared.meshes.load_mesh` does this for glTF by default, for OBJ with up_axis="y").
* **Scale and centre.** Positions are in the scene's world units (the units of the scene box; glTF reads them as
  metres) and are not re-centred by default. `ExportSettings.center` moves the bounding-box centre to the origin
  and `normalize_radius` scales so the farthest vertex from it lies at that radius; both apply to the files only
  (albedo_fn and the preview always work in the world frame). The GLB records the applied offset and scale in
  `asset.extras`, the OBJ in its header comment.
* **Texture coordinates.** Internally and in OBJ `vt`, v points up (v = 0 is the PNG's bottom row). glTF's
  TEXCOORD_0 origin is the image's top-left, so the GLB stores (u, 1 - v). One PNG serves both.
* **Topology.** The GLB has one vertex per (vertex, chart) pair (split at uv seams); the OBJ keeps the welded
  positions with separate uv indices. Normals are the welded mesh's smooth normals, so shading has no seams.
"""

from __future__ import annotations

from services.scene.export.bake import BakedTexture, bake_texture, dilate
from services.scene.export.check import MeshReport, check_mesh
from services.scene.export.pipeline import FILE_NAMES, ExportedMesh, ExportSettings, export_textured_mesh
from services.scene.export.unwrap import UVAtlas, unwrap
from services.scene.export.writers import y_up_to_z_up, z_up_to_y_up

__all__ = [
    "FILE_NAMES",
    "BakedTexture",
    "ExportSettings",
    "ExportedMesh",
    "MeshReport",
    "UVAtlas",
    "bake_texture",
    "check_mesh",
    "dilate",
    "export_textured_mesh",
    "unwrap",
    "y_up_to_z_up",
    "z_up_to_y_up",
]
