"""FoldServe's shared core, and the ``foldserve`` command (:mod:`foldserve.cli`).

What both halves use lives here, owned by neither: the model repository contract
(:mod:`foldserve.model_format`), the KServe V2 datatype table (:mod:`foldserve.datatypes`),
ONNX graph walking (:mod:`foldserve.model_graph`), the ONNX-level BN folder
(:mod:`foldserve.onnx_fold`), shared-file writes and locks (:mod:`foldserve.files`) and
latency statistics (:mod:`foldserve.latency_stats`). The core imports neither torch nor
FastAPI, nor ``training`` or ``service``: they import it. Only the command's dispatcher
imports a half, and only the one a command asks for. Every install carries this package
(the serving image too).
"""
