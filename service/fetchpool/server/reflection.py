"""Server reflection: ``grpc.reflection.v1`` beside ``grpc.reflection.v1alpha``.

grpcio-reflection implements only v1alpha (grpc/grpc#38576, open). v1 is the same protocol under
another package name (same messages, same field numbers), and current tools (grpcurl, Postman,
grpc-java's ``ProtoReflectionServiceV1`` users) ask for it first. So the library's servicer serves
both: v1 calls are decoded and encoded with v1alpha's message classes (the bytes are identical),
and a v1 file descriptor, v1alpha's renamed, joins the descriptor pool so that reflection can
describe the v1 service too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["V1_SERVICE", "enable_reflection"]

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = ".grpc.reflection.v1alpha."


def _renamed(type_name: str) -> str:
    return type_name.replace(_V1ALPHA_PACKAGE, ".grpc.reflection.v1.")


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add the v1 reflection file (v1alpha's, renamed) to ``pool`` unless it is there."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.type_name:  # only message fields have one (assigning "" would set it)
                message_field.type_name = _renamed(message_field.type_name)
    for method in proto.service[0].method:
        method.input_type, method.output_type = _renamed(method.input_type), _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` and both reflection services."""
    _add_v1_descriptor(descriptor_pool.Default())
    # `aio` is the module's public asyncio API, missing from its type stubs.
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),))
