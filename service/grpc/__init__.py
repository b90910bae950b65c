"""gRPC: Triton's ``inference.GRPCInferenceService`` and ``grpc.health.v1``.

Thin transport over the data plane: the servicer, the server and its call gate, the
tensor codec and the mapping of the data plane's errors to gRPC status codes.
"""
