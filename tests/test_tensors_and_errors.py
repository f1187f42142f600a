from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from google.rpc import code_pb2, error_details_pb2
from magic3d.v1 import common_pb2

from shared import cameras, tensors
from shared.errors import InvalidArgument, ResourceExhausted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int32, torch.int64])
def test_tensor_round_trip_is_exact(dtype):
    value = (torch.randn(2, 3, 5) * 50).to(dtype)
    message = tensors.to_proto(value)
    assert list(message.shape) == [2, 3, 5]
    assert torch.equal(tensors.from_proto(message), value)


def test_tensor_bytes_are_little_endian_raw():
    message = tensors.to_proto(torch.tensor([1.0], dtype=torch.float32))
    assert message.data == b"\x00\x00\x80\x3f"


def test_byte_length_mismatch_names_the_field():
    message = common_pb2.Tensor(dtype=common_pb2.SCALAR_TYPE_FLOAT32, shape=[2, 2], data=b"\x00" * 12)
    with pytest.raises(InvalidArgument) as caught:
        tensors.from_proto(message, field="images")
    assert caught.value.field == "images.data"


def test_unsupported_dtype_names_the_field():
    message = common_pb2.Tensor(dtype=common_pb2.SCALAR_TYPE_UNSPECIFIED, shape=[1], data=b"\x00" * 4)
    with pytest.raises(InvalidArgument) as caught:
        tensors.from_proto(message, field="images")
    assert caught.value.field == "images.dtype"


def test_error_status_carries_field_violation_and_retry_info():
    status = InvalidArgument("must be positive", "guidance_scale").to_rpc_status()
    assert status.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "guidance_scale"
    busy = ResourceExhausted("queue full", retry_after_s=0.5).to_rpc_status()
    info = error_details_pb2.RetryInfo()
    assert busy.code == code_pb2.RESOURCE_EXHAUSTED and busy.details[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() == 500_000_000
    assert InvalidArgument.code == grpc.StatusCode.INVALID_ARGUMENT


def test_camera_round_trip_and_geometry():
    camera = cameras.orbit_camera(30.0, 20.0, 2.0, fovy_deg=50.0, size=64, background_color=(0.1, 0.2, 0.3))
    back = cameras.from_proto(cameras.to_proto(camera))
    assert torch.allclose(back.camera_to_world, camera.camera_to_world)
    assert (back.azimuth_deg, back.elevation_deg, back.distance, back.fovy_deg) == pytest.approx((30, 20, 2, 50))
    assert back.background_color == pytest.approx((0.1, 0.2, 0.3))
    # The camera looks at the origin: its -Z axis points from its position to the origin.
    position, forward = camera.camera_to_world[:3, 3], -camera.camera_to_world[:3, 2]
    assert torch.allclose(forward, -position / position.norm(), atol=1e-6)
    # The origin projects to the image centre.
    clip = camera.world_to_clip() @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(clip[:2] / clip[3], torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_a_background_image_travels_in_half_or_single_and_arrives_in_single(dtype):
    image = torch.rand(8, 8, 3, dtype=dtype)
    camera = dataclasses.replace(cameras.orbit_camera(0.0, 20.0, 2.0, size=8), background_image=image)
    message = cameras.to_proto(camera)
    sent = torch.float16 if dtype == torch.float16 else torch.float32  # half stays half (half the bytes)
    assert len(message.background.image.data) == image.numel() * torch.empty((), dtype=sent).element_size()
    back = cameras.from_proto(message)
    assert back.background_image.dtype == torch.float32
    torch.testing.assert_close(back.background_image, image.to(sent).float(), atol=0, rtol=0)


def test_camera_with_bad_pose_names_the_field():
    message = cameras.to_proto(cameras.orbit_camera(0, 0, 2.0))
    del message.pose.camera_to_world[5:]
    with pytest.raises(InvalidArgument) as caught:
        cameras.from_proto(message, field="cameras[0]")
    assert caught.value.field == "cameras[0].pose.camera_to_world"


def test_logs_follow_the_current_stderr(monkeypatch):
    """Loggers write to whatever stderr is now (a CLI or test runner may have closed the one of start-up)."""
    import io
    import json
    import sys

    from shared import logging as project_logging

    project_logging.configure()
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    project_logging.get_logger("test").error("stderr_swapped", job_id="job-1")
    line = json.loads(buffer.getvalue().strip().splitlines()[-1])
    assert line["event"] == "stderr_swapped" and line["job_id"] == "job-1"
