"""Analytic antialiasing in pure PyTorch, after nvdiffrast's `antialias` (Laine et al. 2020, section 4.4): the
silhouette (visibility) gradient the pure-PyTorch rasteriser lacks.

For each pair of horizontally or vertically neighbouring pixels whose triangle ids differ, the triangle seen in
the nearer pixel (the only one where one of them is background) is the occluder. The segment between the two
pixel centres leaves the occluder (it covers its own pixel's centre, not the other one's) through one of its edges;
when that edge is a silhouette edge (no neighbouring triangle across it, or the neighbour folds back behind it in
screen space: its opposite vertex lies on the same side of the edge), the two colours are blended by where the
edge crosses (an edge only for the pairs it crosses more steeply than 45 degrees, as in nvdiffrast: each
outline is counted once): at fraction f of the way from the occluder's pixel centre (0) to the other's (1), the other pixel
gets (f - 1/2) of the occluder's colour when f > 1/2 (the occluder reaches into its half), else the occluder's
pixel gets (1/2 - f) of the other colour. A 1D box filter, continuous at f = 1/2, and differentiable w.r.t. the
edge's vertex positions through f (and w.r.t. both colours): moving an outline outwards pulls the pair's colours
towards the occluder's. Interior edges of one smooth surface blend nothing, so a closed mesh changes only along
its outlines (like nvdiffrast, the mesh must share vertex indices across edges).

Cost: one gather and a few arithmetic ops per discontinuity pair; no per-face windows.
"""

from __future__ import annotations

import torch

__all__ = ["analytic_antialias", "contour_antialias", "silhouette_edges"]


def _twin_opposite(tri: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """(F, 3) long: for edge k of face f (vertices k -> k+1), the vertex opposite it in the neighbouring face across
    that edge, -1 on a boundary edge. A non-manifold edge pairs its faces in sorted order."""
    start, end = tri, tri.roll(-1, dims=1)
    opposite = tri.roll(-2, dims=1)
    keys = (torch.minimum(start, end) * num_vertices + torch.maximum(start, end)).reshape(-1)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    twin = torch.full_like(keys, -1)
    same = sorted_keys[1:] == sorted_keys[:-1]
    first, second = order[:-1][same], order[1:][same]
    twin[first] = second
    twin[second] = first
    flat_opposite = opposite.reshape(-1)
    return torch.where(twin >= 0, flat_opposite[twin.clamp_min(0)], twin).reshape(tri.shape)


def silhouette_edges(screen: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """screen (B, V, 2) vertex positions in pixels, tri (F, 3) long -> (B, F, 3) bool: edge k (k -> k+1) of
    face f is a silhouette edge in view b (boundary, or the neighbour's opposite vertex on the third vertex's side)."""
    twin = _twin_opposite(tri, screen.shape[1])
    start, end, third = screen[:, tri], screen[:, tri.roll(-1, dims=1)], screen[:, tri.roll(-2, dims=1)]
    other = screen[:, twin.clamp_min(0)]

    def side(point: torch.Tensor) -> torch.Tensor:
        edge, rel = end - start, point - start
        return edge[..., 0] * rel[..., 1] - edge[..., 1] * rel[..., 0]

    return (twin < 0)[None] | (side(third) * side(other) >= 0)


def analytic_antialias(
    color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor
) -> torch.Tensor:
    """color (B, H, W, C), rast (B, H, W, 4) as `Rasterizer.rasterize` returns it (bottom row first),
    pos_clip (B, V, 4), tri (F, 3) -> (B, H, W, C), silhouette edges blended; differentiable w.r.t. color and
    pos_clip."""
    if pos_clip.ndim == 2:
        pos_clip = pos_clip[None]
    batch, height, width, channels = color.shape
    if tri.shape[0] == 0:
        return color
    tri = tri.to(pos_clip.device, torch.long)
    w = pos_clip[..., 3:4]
    w = torch.where(w.abs() > 1e-12, w, torch.full_like(w, 1e-12))
    ndc = pos_clip[..., :2] / w
    size = torch.tensor([width, height], dtype=pos_clip.dtype, device=pos_clip.device)
    screen = (ndc + 1.0) * 0.5 * size  # (B, V, 2) pixels; the centre of (row, col) is (col + 0.5, row + 0.5)
    with torch.no_grad():
        silhouette = silhouette_edges(screen.detach(), tri)  # (B, F, 3)
    ids = rast[..., 3].detach().round().long()  # (B, H, W), 0 = background
    depth = rast[..., 2].detach()
    flat_color = color.reshape(-1, channels)
    delta = torch.zeros_like(flat_color)
    for axis in (2, 1):  # along a row (x), then along a column (y)
        pair_delta, pixels = _pair_blends(flat_color, ids, depth, screen, tri, silhouette, axis)
        if pixels is not None:
            delta = delta.index_add(0, pixels, pair_delta)
    return (flat_color + delta).reshape(batch, height, width, channels)


def _pair_blends(
    flat_color: torch.Tensor, ids: torch.Tensor, depth: torch.Tensor, screen: torch.Tensor, tri: torch.Tensor,
    silhouette: torch.Tensor, axis: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The colour changes of the discontinuity pairs along `axis` (2: x, 1: y) -> (deltas (N, C), pixels (N,))."""
    batch, height, width = ids.shape
    lead = [slice(None)] * 3
    tail = [slice(None)] * 3
    lead[axis], tail[axis] = slice(None, -1), slice(1, None)
    first_ids, second_ids = ids[tuple(lead)], ids[tuple(tail)]
    differ = first_ids != second_ids
    if not bool(differ.any()):
        return flat_color[:0], None
    b, row, col = torch.nonzero(differ, as_tuple=True)
    step_row, step_col = (0, 1) if axis == 2 else (1, 0)
    p_index = (b * height + row) * width + col  # the lower pixel of the pair (smaller x or y)
    q_index = p_index + step_row * width + step_col
    id_p, id_q = first_ids[b, row, col], second_ids[b, row, col]
    depth_flat = depth.reshape(-1)
    p_in_front = (id_q == 0) | ((id_p != 0) & (depth_flat[p_index] <= depth_flat[q_index]))
    face = torch.where(p_in_front, id_p, id_q) - 1
    occluder = torch.where(p_in_front, p_index, q_index)
    other = torch.where(p_in_front, q_index, p_index)
    direction = torch.where(p_in_front, 1.0, -1.0).to(screen.dtype)  # occluder -> other along the axis

    along, across = (0, 1) if axis == 2 else (1, 0)
    corners = screen[b[:, None], tri[face]]  # (N, 3, 2)
    start, end = corners, corners.roll(-1, dims=1)
    line = (row if axis == 2 else col).to(screen.dtype)[:, None] + 0.5  # the pair's row (or column) centre
    occluder_centre = torch.where(p_in_front, col if axis == 2 else row, (col if axis == 2 else row) + 1)
    centre = occluder_centre.to(screen.dtype)[:, None] + 0.5
    t0, t1 = start[..., across] - line, end[..., across] - line
    span, run = t1 - t0, end[..., along] - start[..., along]
    crosses = (t0 * t1 <= 0) & (span != 0)
    ratio = -t0 / torch.where(span != 0, span, torch.ones_like(span))
    fraction = (start[..., along] + ratio * run - centre) * direction[:, None]  # (N, 3)
    # The segment leaves the (convex) occluder where the line through both centres does, towards the other pixel:
    # the crossing edge furthest along.
    chosen = torch.where(crosses, fraction.detach(), torch.full_like(fraction, -3.0)).argmax(dim=1, keepdim=True)
    f = fraction.gather(1, chosen).squeeze(1)
    # Each edge is handled by one pair direction only (the pairs it crosses more steeply: |span| >= |run|), so an
    # outline moving by dn changes the image's coverage by dn per unit length, not twice that.
    steep = (span.abs() >= run.abs()).gather(1, chosen).squeeze(1)
    on_outline = silhouette[b, face].gather(1, chosen).squeeze(1)
    tolerance = 1.0 / 16.0  # pixel centres on an edge: the rasteriser's fill rule and float error
    found = crosses.gather(1, chosen).squeeze(1) & steep & on_outline & (f > -tolerance) & (f < 1 + tolerance)
    if not bool(found.any()):
        return flat_color[:0], None
    f = f[found].clamp(0.0, 1.0)
    occluder, other = occluder[found], other[found]
    color_occluder, color_other = flat_color[occluder], flat_color[other]
    reaches = (f > 0.5)[:, None]
    weight = (f - 0.5).abs()[:, None]
    deltas = torch.where(reaches, weight * (color_occluder - color_other), weight * (color_other - color_occluder))
    pixels = torch.where(reaches.squeeze(1), other, occluder)
    return deltas, pixels


def _contour_edges(screen: torch.Tensor, tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The silhouette edges of each view, each once -> (batch index, face index, edge index k) (E,) each."""
    twin_face = _twin_face(tri)  # (F, 3)
    faces = torch.arange(tri.shape[0], device=tri.device)[:, None]
    once = (twin_face < 0) | (faces < twin_face)  # an inner edge is kept by the lower of its two faces
    batch, face, edge = torch.nonzero(silhouette_edges(screen, tri) & once[None], as_tuple=True)
    return batch, face, edge


def _twin_face(tri: torch.Tensor) -> torch.Tensor:
    """(F, 3) long: the face across edge k (k -> k+1) of face f, -1 on a boundary edge."""
    start, end = tri, tri.roll(-1, dims=1)
    num_vertices = int(tri.max()) + 1
    keys = (torch.minimum(start, end) * num_vertices + torch.maximum(start, end)).reshape(-1)
    order = torch.argsort(keys)
    same = keys[order][1:] == keys[order][:-1]
    twin = torch.full_like(keys, -1)
    first, second = order[:-1][same], order[1:][same]
    twin[first] = second // 3
    twin[second] = first // 3
    return twin.reshape(tri.shape)


def contour_antialias(
    color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor,
    depth_tolerance: float = 0.02,
) -> torch.Tensor:
    """Like `analytic_antialias`, but driven by the silhouette edges themselves instead of the triangle seen at a
    pixel: each visible silhouette edge blends every pixel pair whose centres it separates. nvdiffrast's choice
    (the occluder pixel's own triangle must own the silhouette edge) misses most of the outline when triangles are
    smaller than pixels, as the fine stage's marching-tetrahedra mesh is at CPU resolutions (about 8% of the outline
    of a 64-cell mesh at 64x64 gets a gradient, against all of it here).

    A crossing counts where the pixel on the surface's side of the edge shows a surface not farther than the edge
    (clip w within `depth_tolerance`, relative) and the other pixel shows background or something farther; where
    several edges cross one pixel pair, the one reaching furthest towards the other pixel is used.
    """
    if pos_clip.ndim == 2:
        pos_clip = pos_clip[None]
    batch, height, width, channels = color.shape
    if tri.shape[0] == 0:
        return color
    tri = tri.to(pos_clip.device, torch.long)
    w = pos_clip[..., 3]
    safe_w = torch.where(w.abs() > 1e-12, w, torch.full_like(w, 1e-12))
    size = torch.tensor([width, height], dtype=pos_clip.dtype, device=pos_clip.device)
    screen = (pos_clip[..., :2] / safe_w[..., None] + 1.0) * 0.5 * size  # (B, V, 2) pixels
    flat_color = color.reshape(-1, channels)
    with torch.no_grad():
        b, face, k = _contour_edges(screen.detach(), tri)
        pixel_w = (rast[..., 3] > 0) * _interpolate_w(w.detach(), rast, tri)  # (B, H, W), 0 on background
    if b.numel() == 0:
        return color
    ends = torch.stack([tri[face, k], tri[face, (k + 1) % 3], tri[face, (k + 2) % 3]], dim=1)  # (E, 3) + third
    points = screen[b[:, None], ends]  # (E, 3, 2), differentiable
    depths = w.detach()[b[:, None], ends[:, :2]]  # (E, 2)
    delta = torch.zeros_like(flat_color)
    run = (points[:, 1] - points[:, 0]).detach()
    steep = run[:, 1].abs() >= run[:, 0].abs()
    for axis, selected in ((0, steep), (1, ~steep)):  # steep edges split pixel pairs along x (rows), others along y
        if bool(selected.any()):
            update = _contour_blends(
                flat_color, pixel_w, b[selected], points[selected], depths[selected], axis, depth_tolerance
            )
            if update is not None:
                delta = delta.index_add(0, update[1], update[0])
    return (flat_color + delta).reshape(batch, height, width, channels)


def _interpolate_w(w: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """(B, V) clip w -> (B, H, W) at each covered pixel (perspective-correct barycentrics of `rast`)."""
    face = (rast[..., 3].round().long() - 1).clamp_min(0)
    corners = torch.gather(w[:, None, None, :].expand(-1, *face.shape[1:], -1), 3, tri[face].reshape(*face.shape, 3))
    u, v = rast[..., 0], rast[..., 1]
    return u * corners[..., 0] + v * corners[..., 1] + (1 - u - v) * corners[..., 2]


def _contour_blends(
    flat_color: torch.Tensor, pixel_w: torch.Tensor, b: torch.Tensor, points: torch.Tensor, depths: torch.Tensor,
    axis: int, depth_tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Blends of edges (E,) with endpoints and third vertex `points` (E, 3, 2) across pixel pairs along `axis`
    (0: x, the pairs of a row; 1: y) -> (deltas (N, C), flat pixel indices (N,)) or None."""
    batch, height, width = pixel_w.shape
    along, across = axis, 1 - axis
    extent_along, extent_across = (width, height) if axis == 0 else (height, width)
    start, end, third = points[:, 0], points[:, 1], points[:, 2]
    with torch.no_grad():
        low = torch.minimum(start[:, across], end[:, across])
        high = torch.maximum(start[:, across], end[:, across])
        first = torch.ceil(low - 0.5).long().clamp_min(0)
        last = torch.floor(high - 0.5).long().clamp_max(extent_across - 1)
        counts = (last - first + 1).clamp_min(0)
    if int(counts.sum()) == 0:
        return None
    edge = torch.repeat_interleave(torch.arange(b.numel(), device=b.device), counts)
    line_index = first[edge] + (torch.arange(edge.numel(), device=b.device) - (torch.cumsum(counts, 0) - counts)[edge])
    line = line_index.to(points.dtype) + 0.5
    s0, s1, t0, t1 = start[edge, along], end[edge, along], start[edge, across], end[edge, across]
    span = t1 - t0
    flat_edge = span.detach() == 0
    ratio = (line - t0) / torch.where(flat_edge, torch.ones_like(span), span)
    crossing = s0 + ratio * (s1 - s0)
    with torch.no_grad():
        lower = torch.floor(crossing - 0.5).long()  # pixel centres lower + 0.5 <= crossing < lower + 1.5
        inside_image = (lower >= 0) & (lower + 1 < extent_along)
        # Which of the two pixels lies on the surface's side (the third vertex's) of the edge.
        direction = end[edge] - start[edge]
        probe = start[edge].clone()
        probe[:, along] = (lower.to(points.dtype) + 0.5)
        probe[:, across] = line
        side_lower = direction[:, 0] * (probe - start[edge])[:, 1] - direction[:, 1] * (probe - start[edge])[:, 0]
        rel = third[edge] - start[edge]
        side_third = direction[:, 0] * rel[:, 1] - direction[:, 1] * rel[:, 0]
        lower_occludes = side_lower * side_third > 0
        edge_w = depths[edge, 0] + ratio.detach().clamp(0, 1) * (depths[edge, 1] - depths[edge, 0])
        lower_c = lower.clamp(0, extent_along - 2)
        if axis == 0:
            lower_pixel = (b[edge] * height + line_index) * width + lower_c
            step = 1
        else:
            lower_pixel = (b[edge] * height + lower_c) * width + line_index
            step = width
        occluder = torch.where(lower_occludes, lower_pixel, lower_pixel + step)
        other = torch.where(lower_occludes, lower_pixel + step, lower_pixel)
        flat_w = pixel_w.reshape(-1)
        tolerance = depth_tolerance * edge_w
        # Near a smooth outline the surface seen at the occluder's centre is nearer than the contour by up to
        # sqrt(2 R pixel), so only "not farther" is asked of it; a hidden contour fails the other pixel's test.
        seen = (flat_w[occluder] > 0) & (flat_w[occluder] <= edge_w + tolerance)
        behind = (flat_w[other] == 0) | (flat_w[other] > edge_w + tolerance)
        keep = inside_image & seen & behind & ~flat_edge
    if not bool(keep.any()):
        return None
    occ_centre = torch.where(lower_occludes, lower, lower + 1).to(points.dtype) + 0.5
    f = (crossing - occ_centre).abs()
    with torch.no_grad():
        # One crossing per pixel pair: the one reaching furthest from the occluder.
        pair = torch.minimum(occluder, other)
        reach = torch.where(keep, f.detach(), torch.full_like(f, -1.0))
        best = torch.full((int(pair.max()) + 1,), -1.0, dtype=f.dtype, device=f.device)
        best = best.scatter_reduce(0, pair, reach, reduce="amax")
        winner = keep & (reach == best[pair])
        index = torch.arange(pair.numel(), device=pair.device)
        first_winner = torch.full_like(best, float(pair.numel()), dtype=torch.float64)
        first_winner = first_winner.scatter_reduce(0, pair[winner], index[winner].double(), reduce="amin")
        winner &= index.double() == first_winner[pair]
    f = f[winner].clamp(0.0, 1.0)
    occluder, other = occluder[winner], other[winner]
    color_occluder, color_other = flat_color[occluder], flat_color[other]
    reaches = (f > 0.5)[:, None]
    weight = (f - 0.5).abs()[:, None]
    deltas = torch.where(reaches, weight * (color_occluder - color_other), weight * (color_other - color_occluder))
    return deltas, torch.where(reaches.squeeze(1), other, occluder)
