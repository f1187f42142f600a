"""Textured-mesh export: mesh checks, unwrapping, baking (with the v-flip conventions of glTF and OBJ), writers,
padding and the turntable preview. CPU only; one small torus exported once per module."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from services.scene.export import (
    FILE_NAMES,
    ExportSettings,
    bake_texture,
    check_mesh,
    dilate,
    export_textured_mesh,
    unwrap,
    y_up_to_z_up,
    z_up_to_y_up,
)
from shared.meshes import torus
from shared.rasterize import make_rasterizer

torch.set_num_threads(1)

OFFSET = torch.tensor([0.1, -0.2, 0.3])  # off-centre on purpose: files are not re-centred by default
SETTINGS = ExportSettings(texture_size=256, padding_px=4, preview_views=8, preview_resolution=64)


def small_torus():
    mesh = torus(segments=32, minor_segments=16)  # 1024 faces
    return mesh.vertices + OFFSET, mesh.faces


VERTICES, FACES = small_torus()
LOW, HIGH = VERTICES.min(dim=0).values, VERTICES.max(dim=0).values


def albedo(points: torch.Tensor) -> torch.Tensor:
    """Colour = position normalised to the bounding box: every surface point has its own colour."""
    return ((points - LOW.to(points)) / (HIGH - LOW).to(points)).clamp(0, 1)


@pytest.fixture(scope="module")
def exported():
    return export_textured_mesh(VERTICES, FACES, albedo, SETTINGS)


# ------------------------------------------------------------------ helpers
def read_glb(data: bytes) -> tuple[dict, dict[str, np.ndarray], Image.Image]:
    """Minimal spec-level GLB reader: (json document, accessors of the first primitive, base colour image)."""
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_length, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON"
    doc = json.loads(data[20 : 20 + json_length])
    bin_length, bin_type = struct.unpack_from("<I4s", data, 20 + json_length)
    assert bin_type == b"BIN\x00"
    blob = data[28 + json_length : 28 + json_length + bin_length]

    def accessor(index: int) -> np.ndarray:
        acc = doc["accessors"][index]
        view = doc["bufferViews"][acc["bufferView"]]
        dtype = {5126: "<f4", 5125: "<u4"}[acc["componentType"]]
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[acc["type"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        return np.frombuffer(blob, dtype, acc["count"] * width, start).reshape(acc["count"], width)

    primitive = doc["meshes"][0]["primitives"][0]
    arrays = {name: accessor(i) for name, i in primitive["attributes"].items()}
    arrays["indices"] = accessor(primitive["indices"]).reshape(-1, 3)
    pbr = doc["materials"][primitive["material"]]["pbrMetallicRoughness"]
    texture = doc["textures"][pbr["baseColorTexture"]["index"]]
    view = doc["bufferViews"][doc["images"][texture["source"]]["bufferView"]]
    image = Image.open(io.BytesIO(blob[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]))
    return doc, arrays, image


def sample_top_left(image: Image.Image, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Bilinear sample at texture coordinates with the origin at the image's top-left (glTF), -> (N, 3) in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    height, width = pixels.shape[:2]
    x = np.clip(u * width - 0.5, 0, width - 1)
    y = np.clip(t * height - 0.5, 0, height - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = pixels[y0, x0] * (1 - fx) + pixels[y0, x1] * fx
    bottom = pixels[y1, x0] * (1 - fx) + pixels[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def centroid_errors(file_vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, image, v_up: bool):
    """Per-face |texture(centroid uv) - albedo(world centroid)|, and the same with the opposite v convention."""
    world = y_up_to_z_up(torch.from_numpy(np.array(file_vertices, dtype=np.float32)))
    centroids = world[torch.from_numpy(np.asarray(faces, dtype=np.int64))].mean(dim=1)
    expected = albedo(centroids).double().numpy()
    uv_c = np.asarray(uv, dtype=np.float64)[np.asarray(faces)].mean(axis=1)
    t = 1.0 - uv_c[:, 1] if v_up else uv_c[:, 1]
    right = np.abs(sample_top_left(image, uv_c[:, 0], t) - expected)
    wrong = np.abs(sample_top_left(image, uv_c[:, 0], 1.0 - t) - expected)
    return right, wrong


def assert_colours_match(right: np.ndarray, wrong: np.ndarray) -> None:
    assert right.mean() < 0.005, right.mean()
    assert np.quantile(right, 0.99) < 0.02, np.quantile(right, 0.99)
    assert wrong.mean() > 10 * right.mean() + 0.05  # the check is sharp enough to catch a v flip


# ------------------------------------------------------------------ check_mesh
def test_check_mesh_on_closed_torus():
    report = check_mesh(VERTICES, FACES)
    assert report.watertight and report.consistently_wound and report.outward is True
    assert report.signed_volume > 0 and report.n_components == 1
    assert report.n_boundary_edges == report.n_inconsistent_edges == report.n_nonmanifold_edges == 0
    assert report.num_faces == 1024
    assert report.centre == pytest.approx(OFFSET.tolist(), abs=1e-5)
    assert report.bbox_max[2] - report.bbox_min[2] == pytest.approx(0.24, abs=1e-5)


def test_check_mesh_detects_a_hole_a_flipped_face_and_inward_winding():
    holed = check_mesh(VERTICES, FACES[1:])
    assert not holed.watertight and holed.n_boundary_edges == 3 and holed.outward is None
    flipped = FACES.clone()
    flipped[5] = flipped[5].flip(0)
    one_flipped = check_mesh(VERTICES, flipped)
    assert one_flipped.watertight and not one_flipped.consistently_wound
    assert one_flipped.n_inconsistent_edges == 3 and one_flipped.outward is None
    inward = check_mesh(VERTICES, FACES.flip(1))
    assert inward.watertight and inward.consistently_wound and inward.outward is False


def test_check_mesh_counts_components():
    two = torch.cat([FACES, FACES + VERTICES.shape[0]])
    report = check_mesh(torch.cat([VERTICES, VERTICES + 2.0]), two)
    assert report.n_components == 2 and report.watertight and report.outward is True


@pytest.mark.parametrize(
    ("vertices", "faces", "message"),
    [
        (VERTICES, torch.zeros(0, 3, dtype=torch.long), "no faces"),
        (VERTICES[:, :2], FACES, "vertices must be"),
        (VERTICES, FACES[:, :2], "faces must be"),
        (VERTICES, FACES + 10_000, "out of range"),
        (VERTICES, FACES.float(), "integer"),
    ],
)
def test_bad_meshes_raise_value_error(vertices, faces, message):
    with pytest.raises(ValueError, match=message):
        export_textured_mesh(vertices, faces, albedo, SETTINGS)


def test_bad_albedo_fn_raises_value_error():
    with pytest.raises(ValueError, match="albedo_fn"):
        export_textured_mesh(VERTICES, FACES, lambda p: p[:, :2], ExportSettings(texture_size=32))


# ------------------------------------------------------------------ unwrap / bake
def test_unwrap_in_chunks_keeps_faces_and_order():
    atlas = unwrap(VERTICES, FACES, resolution=128, padding_px=2, max_chunk_faces=256)
    assert atlas.chunks >= 4 and atlas.faces.shape == FACES.shape
    assert torch.equal(atlas.vertex_index[atlas.faces], FACES)  # same faces, same order, same winding
    assert float(atlas.uvs.min()) >= 0.0 and float(atlas.uvs.max()) <= 1.0


@pytest.mark.parametrize("scale", [1e-4, 1e-2])
def test_a_small_mesh_is_charted_like_a_large_one(scale):
    """xatlas leaves out faces under a fixed area, and a mesh 1e-3 across used to give no atlas at all."""
    atlas = unwrap(VERTICES * scale, FACES, resolution=128, padding_px=2)
    assert torch.equal(atlas.vertex_index[atlas.faces], FACES)
    corners = atlas.uvs[atlas.faces]  # (F, 3, 2)
    edges = corners[:, 1:] - corners[:, :1]
    uv_areas = 0.5 * (edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]).abs()
    assert bool((uv_areas > 0).all()) and atlas.charts >= 1  # every face charted, none left at zero area


def test_a_mesh_of_degenerate_faces_is_a_value_error_naming_them():
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]])
    with pytest.raises(ValueError, match="all 2 faces are degenerate"):
        unwrap(flat, torch.tensor([[0, 1, 2], [2, 1, 0]]), resolution=64)
    with pytest.raises(ValueError, match="degenerate"):
        export_textured_mesh(flat, torch.tensor([[0, 1, 2]]), albedo, ExportSettings(texture_size=32))


def test_dilation_takes_the_mean_of_filled_neighbours():
    colors = torch.zeros(9, 9, 3)
    filled = torch.zeros(9, 9, dtype=torch.bool)
    colors[4, 2], colors[4, 6] = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    filled[4, 2] = filled[4, 6] = True
    out, grown = dilate(colors, filled, 2)
    # Each step grows by one texel (8-neighbourhood): Chebyshev distance <= 2 from a seed.
    expected = torch.nn.functional.max_pool2d(filled.float()[None, None], 5, 1, 2)[0, 0].bool()
    assert torch.equal(grown, expected)
    assert torch.allclose(out[4, 3], torch.tensor([1.0, 0, 0])) and torch.allclose(out[2, 2], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(out[4, 4], torch.tensor([0.5, 0, 0.5]))  # between the two: the mean of both
    assert torch.equal(dilate(colors, filled, 0)[1], filled)


def test_padding_fills_texels_next_to_charts():
    atlas = unwrap(VERTICES, FACES, resolution=128, padding_px=2)
    baked = bake_texture(atlas, VERTICES, albedo, make_rasterizer("torch"), size=128, padding_px=3)
    covered, filled = baked.covered, baked.filled
    assert 0.2 < float(covered.float().mean()) < 0.9
    within = torch.nn.functional.max_pool2d(covered.float()[None, None], 7, 1, 3)[0, 0].bool()
    assert torch.equal(filled, within)  # exactly the texels within 3 (Chebyshev) of a chart
    # Padded texels continue the chart colours (no dark background bleeding into bilinear lookups).
    # Padded texels continue the chart colours: each texel next to a chart is close to its covered neighbours'
    # mean, so bilinear lookups at chart borders read no background.
    image = baked.image.float() / 255
    mask = covered.float()
    kernel = torch.ones(1, 1, 3, 3)
    sums = torch.nn.functional.conv2d((image * mask[..., None]).permute(2, 0, 1)[:, None], kernel, padding=1)
    counts = torch.nn.functional.conv2d(mask[None, None], kernel, padding=1)[0, 0]
    first_ring = (counts > 0) & ~covered
    assert bool(first_ring.any())
    neighbour_mean = (sums[:, 0] / counts.clamp(min=1)).permute(1, 2, 0)
    assert float((image - neighbour_mean).abs()[first_ring].max()) < 2.5 / 255


# ------------------------------------------------------------------ files
def test_export_returns_exactly_the_named_files(exported):
    assert set(exported.files) == set(FILE_NAMES)
    assert exported.faces == 1024 and exported.uv_vertices >= VERTICES.shape[0]
    assert exported.report.watertight and exported.report.outward
    assert Image.open(io.BytesIO(exported.files["texture.png"])).size == (256, 256)


def test_glb_loads_with_trimesh_textured(exported):
    mesh = trimesh.load(io.BytesIO(exported.files["model.glb"]), file_type="glb", force="mesh")
    assert len(mesh.faces) == 1024
    assert mesh.visual.kind == "texture"
    material = mesh.visual.material
    assert material.baseColorTexture.size == (256, 256)
    assert material.metallicFactor == 0.0 and material.roughnessFactor == 1.0


def test_glb_vertices_are_world_vertices_turned_z_up_to_y_up(exported):
    doc, arrays, _ = read_glb(exported.files["model.glb"])
    positions = torch.from_numpy(arrays["POSITION"].copy())
    rotated = z_up_to_y_up(VERTICES)
    nearest = torch.cdist(positions, rotated, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert float(nearest.values.max()) < 1e-6  # every GLB vertex is a rotated world vertex
    assert nearest.indices.unique().numel() == VERTICES.shape[0]  # and every world vertex is there
    assert float(positions[:, 1].max()) == pytest.approx(float(VERTICES[:, 2].max()), abs=1e-6)  # +Z -> +Y
    assert float(positions[:, 2].max()) == pytest.approx(-float(VERTICES[:, 1].min()), abs=1e-6)  # +Y -> -Z
    assert len(arrays["indices"]) == 1024
    file_normals = torch.from_numpy(arrays["NORMAL"].copy())
    outward = (file_normals * (positions - z_up_to_y_up(OFFSET[None]))).sum(1)
    assert bool((outward > -0.5).all())  # normals rotated with the positions (still roughly outward)
    pbr = doc["materials"][0]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == 1.0


def test_glb_texture_matches_albedo_at_face_centroids(exported):
    # Spec level: TEXCOORD_0 has its origin at the top-left of the image.
    _, arrays, image = read_glb(exported.files["model.glb"])
    right, wrong = centroid_errors(arrays["POSITION"], arrays["indices"].astype(np.int64), arrays["TEXCOORD_0"],
                                   image, v_up=False)
    assert_colours_match(right, wrong)
    # Through trimesh, which turns glTF uvs into v-up ones on load.
    mesh = trimesh.load(io.BytesIO(exported.files["model.glb"]), file_type="glb", force="mesh", process=False)
    right, wrong = centroid_errors(mesh.vertices, mesh.faces, mesh.visual.uv, mesh.visual.material.baseColorTexture,
                                   v_up=True)
    assert_colours_match(right, wrong)


def test_obj_mtl_png_load_back_with_matching_colours(exported, tmp_path):
    paths = exported.write_to(tmp_path)
    obj = paths["model.obj"].read_text()
    assert "mtllib model.mtl" in obj and "usemtl" in obj
    assert "map_Kd texture.png" in paths["model.mtl"].read_text()
    mesh = trimesh.load(str(paths["model.obj"]), force="mesh")
    assert len(mesh.faces) == 1024
    assert mesh.visual.kind == "texture"
    image = mesh.visual.material.image
    assert image is not None and image.size == (256, 256)
    # OBJ keeps welded positions: they are exactly the rotated world vertices.
    raw = np.array([line.split()[1:] for line in obj.splitlines() if line.startswith("v ")], dtype=np.float32)
    assert np.allclose(raw, z_up_to_y_up(VERTICES).numpy(), atol=1e-6)
    right, wrong = centroid_errors(mesh.vertices, mesh.faces, mesh.visual.uv, image, v_up=True)  # OBJ vt: v up
    assert_colours_match(right, wrong)


def test_centre_and_normalise_apply_to_the_files_only():
    settings = ExportSettings(texture_size=64, padding_px=2, preview_views=1, preview_resolution=16,
                              center=True, normalize_radius=1.0)
    seen: list[torch.Tensor] = []

    def recording_albedo(points: torch.Tensor) -> torch.Tensor:
        seen.append(points)
        return albedo(points)

    out = export_textured_mesh(VERTICES, FACES, recording_albedo, settings)
    _, arrays, _ = read_glb(out.files["model.glb"])
    positions = arrays["POSITION"]
    assert np.allclose((positions.max(0) + positions.min(0)) / 2, 0, atol=1e-5)
    assert np.linalg.norm(positions, axis=1).max() == pytest.approx(1.0, abs=1e-5)
    queried = torch.cat(seen)
    assert bool((queried.min(0).values >= LOW - 1e-4).all() and (queried.max(0).values <= HIGH + 1e-4).all())
    assert float(queried[:, 2].mean()) == pytest.approx(0.3, abs=0.03)  # world frame, not the file's


def test_open_mesh_exports_double_sided():
    settings = ExportSettings(texture_size=32, padding_px=1, preview_views=1, preview_resolution=16)
    out = export_textured_mesh(VERTICES, FACES[16:], albedo, settings)
    doc, arrays, _ = read_glb(out.files["model.glb"])
    assert not out.report.watertight and out.faces == 1008 and len(arrays["indices"]) == 1008
    assert doc["materials"][0]["doubleSided"] is True


# ------------------------------------------------------------------ preview
def test_preview_grid_and_turntable_gif(exported):
    grid = Image.open(io.BytesIO(exported.files["preview.png"]))
    assert grid.size == (4 * 64, 2 * 64)
    pixels = np.asarray(grid.convert("RGB"))
    assert (pixels[0, 0] == 255).all()  # white background
    first = pixels[:64, :64]
    assert (first.sum(-1) < 3 * 250).mean() > 0.15  # the object covers a good part of the view
    gif = Image.open(io.BytesIO(exported.files["turntable.gif"]))
    assert gif.n_frames == 8 and gif.size == (64, 64)
