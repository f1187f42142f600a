"""The Magic3D coarse stage's neural field and volume renderer (pure PyTorch; tcnn optional).

    field = NeuralField(FieldConfig(...)); background = BackgroundMLP(); grid = OccupancyGrid(OccupancyConfig(...))
    renderer = VolumeRenderer(RendererConfig(...))
    out = renderer.render(field, background, cameras, resolution=64, generator=g, occupancy=grid)
    images = out["rgb"]                      # (B, 3, H, W), top-row-first, in [0, 1]
    loss = lambda_orient * orientation_loss(out["weights"], out["normals"], out["view_dirs"], out["opacity"])
    grid.update(field, step)                 # refreshes every OccupancyConfig.update_every steps
"""

from services.scene.field.encoding import (
    ENCODINGS,
    Encoding,
    FrequencyEncoding,
    HashGridConfig,
    TcnnHashGrid,
    TorchHashGrid,
    available_backends,
    make_encoding,
    register_backend,
    tcnn_available,
    tcnn_encoding_config,
)
from services.scene.field.field import BackgroundMLP, FieldConfig, NeuralField, param_groups
from services.scene.field.occupancy import OccupancyConfig, OccupancyGrid
from services.scene.field.renderer import (
    RendererConfig,
    VolumeRenderer,
    camera_rays,
    distortion_loss,
    opacity_entropy,
    orientation_loss,
    ray_sphere,
    sparsity_loss,
)

__all__ = [
    "BackgroundMLP",
    "ENCODINGS",
    "Encoding",
    "FieldConfig",
    "FrequencyEncoding",
    "HashGridConfig",
    "NeuralField",
    "OccupancyConfig",
    "OccupancyGrid",
    "RendererConfig",
    "TcnnHashGrid",
    "TorchHashGrid",
    "VolumeRenderer",
    "available_backends",
    "camera_rays",
    "distortion_loss",
    "make_encoding",
    "opacity_entropy",
    "orientation_loss",
    "param_groups",
    "ray_sphere",
    "register_backend",
    "sparsity_loss",
    "tcnn_available",
    "tcnn_encoding_config",
]
