"""File writers: binary glTF 2.0 (GLB) and OBJ + MTL, both +Y up, plus PNG encoding.

Axes: the scene's world is right-handed +Z up; glTF mandates +Y up (and OBJ files are conventionally +Y up), so
every position and normal is written as (x, y, z) -> (x, z, -y): a -90 degree rotation about +X (a proper
rotation, so handedness and triangle winding are unchanged; world -Y becomes the file's +Z "front").

Texture coordinates: this package keeps uvs with v up (v = 0 is the image's bottom row). OBJ's `vt` is v up too,
so it is written as is. glTF's TEXCOORD_0 has its origin at the image's top-left with t growing downwards, so it is
written as (u, 1 - v). Both files use the same top-row-first PNG.

The GLB is written by hand (no trimesh processing, so vertices stay exactly as given): one mesh, one primitive
with POSITION, NORMAL, TEXCOORD_0 and uint32 indices, and one PBR metallic-roughness material whose
baseColorTexture is the embedded PNG, metallic 0, roughness 1 (a baked albedo is diffuse only).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import torch
from PIL import Image

OBJ_NAME, MTL_NAME, TEXTURE_NAME = "model.obj", "model.mtl", "texture.png"
MATERIAL_NAME = "baked_albedo"

_FLOAT, _UINT32 = 5126, 5125  # glTF componentType
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963  # glTF bufferView targets
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071


def z_up_to_y_up(points: torch.Tensor) -> torch.Tensor:
    """(N, 3) world (+Z up) -> file (+Y up): (x, y, z) -> (x, z, -y). Also right for normals."""
    return torch.stack([points[:, 0], points[:, 2], -points[:, 1]], dim=1)


def y_up_to_z_up(points: torch.Tensor) -> torch.Tensor:
    """Inverse of `z_up_to_y_up`: (x, y, z) -> (x, -z, y)."""
    return torch.stack([points[:, 0], -points[:, 2], points[:, 1]], dim=1)


def encode_png(image: torch.Tensor | np.ndarray) -> bytes:
    """(H, W, 3) uint8, top-row-first -> PNG bytes."""
    array = image.numpy() if isinstance(image, torch.Tensor) else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def glb_bytes(
    positions: torch.Tensor,
    normals: torch.Tensor,
    uvs: torch.Tensor,
    faces: torch.Tensor,
    png: bytes,
    double_sided: bool = False,
    extras: dict | None = None,
) -> bytes:
    """A single-file glTF 2.0 binary. Inputs are in file conventions already except uvs (v up, flipped here).

    positions, normals (W, 3) +Y up; uvs (W, 2) v up; faces (F, 3) counter-clockwise from outside.
    """
    pos = np.ascontiguousarray(positions.detach().cpu().numpy(), dtype="<f4")
    nor = np.ascontiguousarray(normals.detach().cpu().numpy(), dtype="<f4")
    tex = uvs.detach().cpu().numpy().astype("<f4")
    tex = np.ascontiguousarray(np.stack([tex[:, 0], 1.0 - tex[:, 1]], axis=1), dtype="<f4")
    idx = np.ascontiguousarray(faces.detach().cpu().numpy(), dtype="<u4")

    blob = bytearray()
    views: list[dict] = []

    def add_view(data: bytes, target: int | None) -> int:
        blob.extend(b"\x00" * (-len(blob) % 4))  # every view starts 4-byte aligned
        view = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        views.append(view)
        blob.extend(data)
        return len(views) - 1

    accessors = [
        {"bufferView": add_view(pos.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT, "count": len(pos),
         "type": "VEC3", "min": pos.min(axis=0).tolist(), "max": pos.max(axis=0).tolist()},
        {"bufferView": add_view(nor.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT, "count": len(nor),
         "type": "VEC3"},
        {"bufferView": add_view(tex.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT, "count": len(tex),
         "type": "VEC2"},
        {"bufferView": add_view(idx.tobytes(), _ELEMENT_ARRAY_BUFFER), "componentType": _UINT32,
         "count": int(idx.size), "type": "SCALAR"},
    ]
    image_view = add_view(png, None)
    blob.extend(b"\x00" * (-len(blob) % 4))
    document = {
        "asset": {"version": "2.0", "generator": "magic3d services.scene.export", "extras": extras or {}},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "model"}],
        "meshes": [{"name": "model", "primitives": [{
            "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2},
            "indices": 3, "material": 0, "mode": 4,
        }]}],
        "materials": [{
            "name": MATERIAL_NAME,
            "pbrMetallicRoughness": {
                "baseColorTexture": {"index": 0, "texCoord": 0},
                "baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                "metallicFactor": 0.0,
                "roughnessFactor": 1.0,
            },
            "doubleSided": bool(double_sided),
        }],
        "textures": [{"sampler": 0, "source": 0}],
        "images": [{"bufferView": image_view, "mimeType": "image/png", "name": "texture"}],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                      "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
        "buffers": [{"byteLength": len(blob)}],
        "bufferViews": views,
        "accessors": accessors,
    }
    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)  # the JSON chunk is padded with spaces, the BIN chunk with zeros
    total = 12 + 8 + len(text) + 8 + len(blob)
    header = struct.pack("<4sII", b"glTF", 2, total)
    json_chunk = struct.pack("<I4s", len(text), b"JSON") + text
    bin_chunk = struct.pack("<I4s", len(blob), b"BIN\x00") + bytes(blob)
    return header + json_chunk + bin_chunk


def obj_text(
    positions: torch.Tensor,
    normals: torch.Tensor,
    uvs: torch.Tensor,
    faces: torch.Tensor,
    uv_faces: torch.Tensor,
    header: str = "",
) -> str:
    """OBJ text with separate position/normal (per original vertex) and uv (per uv vertex) indices.

    positions, normals (V, 3) +Y up; uvs (W, 2) v up; faces (F, 3) into positions and normals; uv_faces (F, 3)
    into uvs. Keeping positions welded means the OBJ stays watertight; readers split vertices at seams as needed.
    """
    out = io.StringIO()
    for line in header.splitlines():
        out.write(f"# {line}\n")
    out.write(f"mtllib {MTL_NAME}\no model\n")
    np.savetxt(out, positions.detach().cpu().numpy(), fmt="v %.7g %.7g %.7g")
    np.savetxt(out, uvs.detach().cpu().numpy(), fmt="vt %.7g %.7g")
    np.savetxt(out, normals.detach().cpu().numpy(), fmt="vn %.6g %.6g %.6g")
    out.write(f"usemtl {MATERIAL_NAME}\ns off\n")
    p = faces.detach().cpu().numpy().astype(np.int64) + 1  # OBJ indices are 1-based
    t = uv_faces.detach().cpu().numpy().astype(np.int64) + 1
    corners = np.stack([p, t, p], axis=2).reshape(-1, 9)  # v/vt/vn per corner
    np.savetxt(out, corners, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    return out.getvalue()


def mtl_text() -> str:
    """The material: diffuse texture `texture.png` (relative, next to the MTL), no specular; PBR hints Pr/Pm."""
    return (
        f"newmtl {MATERIAL_NAME}\n"
        "Ka 1.000000 1.000000 1.000000\n"
        "Kd 1.000000 1.000000 1.000000\n"
        "Ks 0.000000 0.000000 0.000000\n"
        "Ns 1.000000\n"
        "d 1.000000\n"
        "illum 1\n"
        "Pr 1.000000\n"
        "Pm 0.000000\n"
        f"map_Kd {TEXTURE_NAME}\n"
    )
