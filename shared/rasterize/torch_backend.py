"""`TorchRasterizer`: a pure-PyTorch, differentiable rasteriser with nvdiffrast's API (see `base`).

Two passes:

1. **Visibility, without grad.** Triangles (all batch items at once) are binned by their screen-space bounding
   box into square pixel tiles (side 1..16, chosen per triangle as about half its bounding box); each
   (triangle, tile) pair tests the tile's pixel centres with edge functions, and the depth test is resolved per
   pixel by a `scatter_reduce(amin)` over 64-bit keys (float32 depth bits << 32 | triangle id, so ties go to
   the lower id). Pairs are processed in chunks so memory stays bounded (`max_chunk_elements` pixel tests per
   chunk). Edge functions of a shared edge are exact negatives of each other, so closed meshes rasterise
   without cracks. Triangle setup runs in float64, the per-pixel tests in float32.
2. **Barycentrics, with autograd.** For each covered pixel the perspective-correct barycentrics of the winning
   triangle are recomputed from `pos_clip` in closed form: with X_i = x_i - p_x w_i and Y_i = y_i - p_y w_i,
   b = (X x Y) / sum(X x Y), i.e. the weights with sum b_i (x_i, y_i) / sum b_i w_i = p. Gradients therefore
   reach the vertex positions (through u, v, z/w) and interpolated attributes at covered pixels; like
   nvdiffrast without `antialias`, moving silhouettes give no gradient.

Differences from nvdiffrast, all documented here:
* triangles with any vertex at w <= 0 (behind the camera) are culled instead of clipped, and pixels whose
  depth falls outside [-1, 1] (beyond the near/far planes) are dropped; no backface culling, as in nvdiffrast;
* pixel centres exactly on a shared edge go to the nearer (then lower-id) triangle; nvdiffrast uses a
  top-left fill rule;
* `antialias` is the identity (no edge blending, no visibility gradients) unless the rasteriser is made with
  `edge_antialias="triangle"` (`shared.rasterize.antialias.analytic_antialias`, nvdiffrast's analytic antialiasing
  in PyTorch) or `"contour"` (the same blend driven by every visible silhouette edge): silhouette gradients.
  Off by default, so renders used as targets (the analytic prior) stay as they were.
"""

from __future__ import annotations

import bisect

import torch

from shared.rasterize.antialias import analytic_antialias, contour_antialias
from shared.rasterize.base import Rasterizer, check_rasterize_inputs

_NO_HIT = torch.iinfo(torch.int64).max

# `TorchRasterizer(edge_antialias=...)`: what `antialias` does.
EDGE_ANTIALIAS = {None: None, "triangle": analytic_antialias, "contour": contour_antialias}

# Implementation note: gathers use `index_select` rather than advanced indexing, and rounding uses integer
# conversion rather than floor/ceil. On a loaded CPU host the latter ops enter an OpenMP parallel region even
# for tiny tensors and can each wait a whole scheduler slice (~8 ms); these forms do not.


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] along dim 0 for any index shape (index_select based)."""
    return values.index_select(0, index.reshape(-1)).reshape(*index.shape, *values.shape[1:])


def _floor(x: torch.Tensor) -> torch.Tensor:
    """floor(x) as int64 for finite x within int64 range."""
    t = x.long()
    return t - (t.to(x.dtype) > x).long()


def _ceil(x: torch.Tensor) -> torch.Tensor:
    t = x.long()
    return t + (t.to(x.dtype) < x).long()


class TorchRasterizer(Rasterizer):
    """Differentiable rasteriser on any torch device; fast enough on CPU for 64x64 training renders."""

    name = "torch"

    def __init__(
        self, tile_size: int | None = None, max_chunk_elements: int = 1 << 20, edge_antialias: str | None = None
    ) -> None:
        """tile_size: fixed square tile side in pixels, or None to pick per triangle (1..16, ~half its bbox).
        max_chunk_elements: pixel tests per chunk; bounds peak memory to ~50 bytes per element.
        edge_antialias: None (`antialias` returns the colour unchanged), or how it blends silhouette edges (and so
        gives visibility gradients): "triangle" (nvdiffrast's algorithm, `analytic_antialias`) or "contour"
        (`contour_antialias`: every visible silhouette edge, for meshes whose triangles are smaller than pixels)."""
        if (tile_size is not None and tile_size < 1) or max_chunk_elements < 256:
            raise ValueError("tile_size must be >= 1 and max_chunk_elements >= 256")
        if edge_antialias not in EDGE_ANTIALIAS:
            raise ValueError(f"edge_antialias must be one of {sorted(map(str, EDGE_ANTIALIAS))}, got {edge_antialias!r}")
        self.tile_size = tile_size
        self.max_chunk_elements = max_chunk_elements
        self.edge_antialias = edge_antialias

    # ---------------------------------------------------------------- rasterize
    def rasterize(self, pos_clip: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        if pos_clip.ndim == 2:
            pos_clip = pos_clip[None]
        check_rasterize_inputs(pos_clip, tri)
        height, width = int(resolution[0]), int(resolution[1])
        tri = tri.to(pos_clip.device, torch.long)
        batch, num_verts = pos_clip.shape[0], pos_clip.shape[1]

        with torch.no_grad():
            winner = self.visibility(pos_clip.detach(), tri, height, width)  # (B*H*W,) face id or -1

        flat = torch.nonzero(winner >= 0).squeeze(1)
        rast = pos_clip.new_zeros(batch * height * width, 4)
        if flat.numel() == 0:
            return rast.reshape(batch, height, width, 4)
        face = winner.index_select(0, flat)
        b_index = torch.div(flat, height * width, rounding_mode="floor")
        pixel = flat - b_index * (height * width)
        row = torch.div(pixel, width, rounding_mode="floor")
        col = pixel - row * width
        dtype = pos_clip.dtype
        px = ((2 * col + 1).to(dtype) / width - 1.0)[:, None]
        py = ((2 * row + 1).to(dtype) / height - 1.0)[:, None]

        corner = _gather(tri, face) + b_index[:, None] * num_verts  # (N, 3) rows of pos_clip.reshape(-1, 4)
        verts = _gather(pos_clip.reshape(-1, 4), corner)  # (N, 3, 4), carries grad
        x, y, z, w = verts.unbind(-1)
        big_x, big_y = x - px * w, y - py * w
        xj, xk = big_x.roll(-1, dims=1), big_x.roll(-2, dims=1)
        yj, yk = big_y.roll(-1, dims=1), big_y.roll(-2, dims=1)
        bary = xj * yk - xk * yj  # (N, 3), unnormalised perspective-correct barycentrics
        bary = bary / bary.sum(dim=1, keepdim=True)
        depth = (bary * z).sum(dim=1) / (bary * w).sum(dim=1)
        values = torch.stack([bary[:, 0], bary[:, 1], depth, (face + 1).to(dtype)], dim=1)
        rast = rast.index_copy(0, flat, values)
        return rast.reshape(batch, height, width, 4)

    def visibility(self, pos_clip: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Nearest triangle per pixel, (B*H*W,) long, -1 where none. No grad; chunked over (triangle, tile)."""
        batch, num_faces = pos_clip.shape[0], tri.shape[0]
        device = pos_clip.device
        best = torch.full((batch * height * width,), _NO_HIT, dtype=torch.int64, device=device)
        if num_faces == 0:
            return best.fill_(-1)
        verts = pos_clip.double().index_select(1, tri.reshape(-1)).reshape(batch * num_faces, 3, 4)
        w = verts[..., 3:4]
        w_ok = w > 1e-12
        ndc = verts[..., :3] / torch.where(w_ok, w, torch.ones_like(w))  # (N, 3 verts, xyz)
        valid = w_ok.all(dim=2).all(dim=1) & torch.isfinite(ndc).all(dim=2).all(dim=1)
        ndc = torch.where(torch.isfinite(ndc), ndc, torch.zeros_like(ndc))
        # Continuous pixel coordinates: pixel index i has its centre at coordinate i.
        scale = ndc.new_tensor([width / 2.0, height / 2.0])
        pix = (ndc[..., :2] + 1.0) * scale - 0.5  # (N, 3, 2)
        cx, cy, cz = pix[..., 0], pix[..., 1], ndc[..., 2]

        # Edge function opposite vertex i: E_i(p) = A_i p_x + B_i p_y + C_i, over vertices j = i+1, k = i+2.
        cxj, cxk = cx.roll(-1, dims=1), cx.roll(-2, dims=1)
        cyj, cyk = cy.roll(-1, dims=1), cy.roll(-2, dims=1)
        edge_a, edge_b, edge_c = cyj - cyk, cxk - cxj, cxj * cyk - cxk * cyj
        area2 = edge_c.sum(1)  # E_0 + E_1 + E_2 is constant = twice the signed area
        valid &= area2 != 0

        limit = pix.new_tensor([width - 1.0, height - 1.0])
        lo = pix.amin(dim=1).clamp(min=-1.0).minimum(limit + 1)  # clamped before rounding (no overflow)
        hi = pix.amax(dim=1).clamp(min=-1.0).minimum(limit + 1)
        first_pixel = _ceil(lo).clamp(min=0)  # (N, 2): x0, y0
        last_pixel = torch.minimum(_floor(hi), limit.long())  # (N, 2): x1, y1
        valid &= (last_pixel >= first_pixel).all(dim=1)

        ids = torch.nonzero(valid).squeeze(1)  # flat (b * F + f)
        if ids.numel() == 0:
            return best.fill_(-1)
        # Orient every edge function positive inside (exact: negation), and fold the depth into a plane.
        sign = area2.sign()[:, None]
        edges = torch.stack([edge_a * sign, edge_b * sign, edge_c * sign], dim=1)  # (N, 3 coef, 3 edges)
        plane = (torch.stack([edge_a, edge_b, edge_c], dim=1) * cz[:, None, :]).sum(-1) / area2[:, None]
        coef = torch.cat([edges, plane[:, :, None]], dim=2).float().index_select(0, ids)  # (n, 3, 4): A, B, C
        bounds = torch.cat([first_pixel, last_pixel], dim=1).index_select(0, ids)  # (n, 4): x0, y0, x1, y1

        # Tile side per triangle: the power of two in [1, 16] nearest above half its bounding-box extent.
        if self.tile_size is None:
            extent = (bounds[:, 2:] - bounds[:, :2]).amax(dim=1) + 1
            tiles = torch.ones_like(extent)
            for side in (2, 4, 8, 16):
                tiles = torch.where(extent > side, torch.full_like(tiles, side), tiles)
        else:
            tiles = torch.full((ids.numel(),), self.tile_size, dtype=torch.long, device=device)
        for tile in tiles.unique().tolist():
            group = torch.nonzero(tiles == tile).squeeze(1)
            self._scan(
                best, coef.index_select(0, group), bounds.index_select(0, group), ids.index_select(0, group),
                int(tile), num_faces, height, width,
            )
        hit = best != _NO_HIT
        return torch.where(hit, best & 0xFFFFFFFF, torch.full_like(best, -1))

    def _scan(
        self,
        best: torch.Tensor,
        coef: torch.Tensor,
        bounds: torch.Tensor,
        owner: torch.Tensor,
        tile: int,
        num_faces: int,
        height: int,
        width: int,
    ) -> None:
        """Tests every (triangle, tile) pair of one tile size, in chunks, and min-reduces depth keys into best."""
        device = coef.device
        tile_lo = torch.div(bounds[:, :2], tile, rounding_mode="floor")
        tile_n = torch.div(bounds[:, 2:], tile, rounding_mode="floor") - tile_lo + 1  # (n, 2) tiles along x, y
        counts = tile_n[:, 0] * tile_n[:, 1]
        offs = torch.arange(tile, device=device)
        off_y = offs[:, None].expand(tile, tile).reshape(1, -1)
        off_x = offs[None, :].expand(tile, tile).reshape(1, -1)
        pairs_per_chunk = max(1, self.max_chunk_elements // (tile * tile))
        cumulative = counts.cumsum(0).tolist()
        total_tris, start = coef.shape[0], 0
        while start < total_tris:
            # The longest run of triangles whose pairs fit the chunk (at least one triangle).
            base = cumulative[start - 1] if start > 0 else 0
            stop = max(bisect.bisect_right(cumulative, base + pairs_per_chunk, lo=start), start + 1)
            sel = torch.arange(start, stop, device=device)
            sel_counts = counts.index_select(0, sel)
            num_pairs = int(cumulative[stop - 1] - base)
            start = stop
            # rep[p] = triangle of pair p, without repeat_interleave: mark each triangle's first pair, cumsum.
            marks = torch.zeros(num_pairs, dtype=torch.long, device=device)
            firsts = sel_counts.cumsum(0) - sel_counts
            marks.scatter_add_(0, firsts, torch.ones_like(firsts))
            rep_local = marks.cumsum(0) - 1
            rep = rep_local + sel[0]
            local = torch.arange(num_pairs, device=device) - firsts.index_select(0, rep_local)
            lo, n = tile_lo.index_select(0, rep), tile_n.index_select(0, rep)
            b = bounds.index_select(0, rep)
            ty = torch.div(local, n[:, 0], rounding_mode="floor")
            tx = local - ty * n[:, 0]
            px = (lo[:, 0] + tx)[:, None] * tile + off_x  # (P, T*T)
            py = (lo[:, 1] + ty)[:, None] * tile + off_y
            inside = (px >= b[:, 0:1]) & (px <= b[:, 2:3]) & (py >= b[:, 1:2]) & (py <= b[:, 3:4])
            c = coef.index_select(0, rep)  # (P, 3, 4)
            values = c[:, 0, :, None] * px[:, None, :].float() + c[:, 1, :, None] * py[:, None, :].float()
            values = values + c[:, 2, :, None]  # (P, 4, T*T): three edge functions, then depth
            inside &= (values[:, :3] >= 0).all(dim=1)
            depth = values[:, 3]
            inside &= (depth >= -1.0) & (depth <= 1.0)
            hits = torch.nonzero(inside.reshape(-1)).squeeze(1)
            if hits.numel() == 0:
                continue
            hit_pair = torch.div(hits, tile * tile, rounding_mode="floor")
            tri_flat = owner.index_select(0, rep.index_select(0, hit_pair))
            b_index = torch.div(tri_flat, num_faces, rounding_mode="floor")
            face = tri_flat - b_index * num_faces
            pixel = b_index * (height * width) + py.reshape(-1).index_select(0, hits) * width
            pixel = pixel + px.reshape(-1).index_select(0, hits)
            depth_bits = (depth.reshape(-1).index_select(0, hits) + 1.0).view(torch.int32).long()
            best.scatter_reduce_(0, pixel, (depth_bits << 32) | face, reduce="amin")

    # -------------------------------------------------------------- interpolate
    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        if rast.ndim != 4 or rast.shape[-1] != 4:
            raise ValueError(f"rast must be (B, H, W, 4), got {list(rast.shape)}")
        batch, height, width = rast.shape[:3]
        tri = tri.to(rast.device, torch.long)
        face = (rast[..., 3].detach() + 0.5).long() - 1  # (B, H, W); ids are exact small integers
        covered = face >= 0
        corners = _gather(tri, face.clamp(min=0))  # (B, H, W, 3) attribute rows
        if attr.ndim == 2:
            table = attr
        elif attr.ndim == 3:
            if attr.shape[0] == 1:
                table = attr[0]
            elif attr.shape[0] == batch:
                offsets = torch.arange(batch, device=rast.device).reshape(-1, 1, 1, 1) * attr.shape[1]
                corners = corners + offsets
                table = attr.reshape(-1, attr.shape[-1])
            else:
                raise ValueError(f"attr batch {attr.shape[0]} does not match rast batch {batch}")
        else:
            raise ValueError(f"attr must be (V, C) or (B, V, C), got {list(attr.shape)}")
        values = _gather(table, corners)  # (B, H, W, 3, C)
        u, v = rast[..., 0], rast[..., 1]
        weights = torch.stack([u, v, 1.0 - u - v], dim=-1).to(values.dtype)
        out = (values * weights[..., None]).sum(dim=-2)
        return out * covered[..., None].to(out.dtype)

    # ---------------------------------------------------------------- antialias
    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        """With `edge_antialias`: analytic antialiasing of silhouette edges, silhouette gradients included.
        Without: the identity (no edge blending, no silhouette gradients)."""
        blend = EDGE_ANTIALIAS[self.edge_antialias]
        return color if blend is None else blend(color, rast, pos_clip, tri)
