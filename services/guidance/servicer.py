"""GuidanceService over plain grpcio: translate messages, call the engine, map errors to google.rpc.Status."""

from __future__ import annotations

import grpc
import structlog
from magic3d.v1 import guidance_pb2, guidance_pb2_grpc

from services.guidance.engine import GuidanceEngine
from services.guidance.rpc_errors import log_rejected
from shared import guidance_api
from shared.errors import ServiceError
from shared.grpcio import abort_with
from shared.logging import get_logger

log = get_logger(__name__)


class GuidanceServicer(guidance_pb2_grpc.GuidanceServiceServicer):
    def __init__(self, engine: GuidanceEngine) -> None:
        self.engine = engine

    def ListPriors(self, request, context):
        return guidance_pb2.ListPriorsResponse(
            priors=[guidance_api.prior_info_to_proto(info) for info in self.engine.list_priors()]
        )

    def ComputeSds(self, request, context):
        with structlog.contextvars.bound_contextvars(job_id=request.job_id, prior=request.prior):
            try:
                sds_request = guidance_api.sds_request_from_proto(request)
                result = self.engine.compute(sds_request, timeout=context.time_remaining())
            except ServiceError as error:
                log_rejected(log, "sds_rejected", error)
                abort_with(context, error)
            except TimeoutError:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued or computing")
            log.info(
                "sds_done",
                batch=sds_request.batch_size,
                server_time_s=round(result.server_time_s, 4),
                finite=all(result.finite),
            )
            return guidance_api.sds_response_to_proto(result, request.prior, request.checkpoint_id)

    def CheckPrompt(self, request, context):
        with structlog.contextvars.bound_contextvars(prior=request.prior):
            try:
                guidance_api.check_prompt_request_fields(request)
                check = self.engine.check_prompt(
                    request.prior, request.prompt, request.negative_prompt, request.checkpoint_id
                )
            except ServiceError as error:
                log_rejected(log, "prompt_rejected", error)
                abort_with(context, error)
            return guidance_api.prompt_check_to_proto(check)
