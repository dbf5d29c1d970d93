"""Latency measured on the device that will run the model.

``service`` (``cli.py target`` / ``python -m search.latency_service``: an HTTP service that times ONNX
models exactly as the search does; it needs only onnxruntime and numpy), ``protocol`` (what a
request may say), ``onnx_check`` (what it accepts: a self-contained ONNX model) and ``client``
(:class:`RemoteTimer`, the search side: the second implementation of
:class:`search.measuring.candidate.Timer`).
"""
