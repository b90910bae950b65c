"""REST: the Open Inference Protocol over HTTP (V2 JSON and binary tensors, V1 predict).

Thin transport over the data plane: routes (:mod:`service.rest.routes`), the REST
exchange the data plane reads, decodes and encodes through (:mod:`service.rest.exchange`),
the V2 and V1 codecs, JSON tensor decoding, per-request HTTP middleware and the limits on
what one connection may hold.
"""
