"""The floor of a Python gRPC server for ``ModelInfer``: grpc.aio, configured as
``serving.grpc_server`` configures it, parsing each request and answering it with one fixed reply
(the LeNet's ten probabilities), nothing else. No server built on grpc.aio goes below its cost a
call; ``benchmarks.grpc_compare`` loads it beside the service, as other comparisons load a bare
Starlette server.

    python -m benchmarks.grpc_floor PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np

from serving.protocol import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def reply() -> bytes:
    answer = pb.ModelInferResponse(model_name="fashion-lenet", model_version="1")
    answer.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    answer.raw_output_contents.append(np.full(10, 0.1, np.float32).tobytes())
    return answer.SerializeToString()


async def serve(port: int) -> None:
    answer = reply()

    async def infer(data: bytes, context) -> bytes:
        pb.ModelInferRequest.FromString(data)
        return answer

    handler = grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 10 * 2**20), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
