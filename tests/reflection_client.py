"""A generic gRPC client that knows Baton's API only through server reflection, as grpcurl or Postman do: it
imports no generated Baton code. Run as a script (a process of its own, so that nothing else has loaded the
generated modules either); prints one JSON line.

    python tests/reflection_client.py ADDRESS list
    python tests/reflection_client.py ADDRESS generate '{"token_ids": {"ids": [1, 2]}, "sampling": {...}}'
"""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main(address: str, command: str, request_json: str = "") -> dict:
    channel = grpc.insecure_channel(address)
    # Every descriptor comes from the server's reflection service: file by file, with their dependencies.
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    services = sorted(database.get_services())
    result: dict = {"services": services}
    if command == "generate":
        method = pool.FindServiceByName("baton.v1.Inference").methods_by_name["Generate"]
        request_cls, response_cls = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        request = json_format.Parse(request_json, request_cls())
        call = channel.unary_stream("/baton.v1.Inference/Generate", request_serializer=request_cls.SerializeToString,
                                    response_deserializer=response_cls.FromString)
        responses = [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in call(request, timeout=120)]
        result["token_ids"] = [t for r in responses for t in r.get("token_ids", [])]
        result["finished"] = bool(responses) and responses[-1].get("finished", False)
        result["response_type"] = response_cls.DESCRIPTOR.full_name
    result["generated_modules_loaded"] = sorted(name for name in sys.modules if name.startswith("baton"))
    channel.close()
    return result


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])), flush=True)
