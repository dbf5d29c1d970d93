"""Everything a latency or a size comes from.

``candidate`` is the one place a candidate is measured: policy -> pruned model -> the runtime's
file (ONNX, or an ExecuTorch program; FP32, or INT8) -> a latency record, timed interleaved with
the unpruned model, identical architectures reused. Below it: ``timing`` (the timing discipline;
needs only numpy and the runtime, so it runs where PyTorch is not installed), ``runtimes`` (ONNX
Runtime, OpenVINO and ExecuTorch, each one small class, and the files they time), ``timing_process``
and ``timing_worker`` (a child process that does nothing but time: ``isolated`` for the search and the
latency target's worker),
``onnx_export`` (PyTorch to ONNX), ``quantize`` (static INT8 in ONNX Runtime), ``int8_check``
(is INT8 faster in this runtime on this CPU?), ``complexity`` (MACs and parameters) and ``hardware``
(the fingerprint that says which machine a latency belongs to).

Nothing is imported here, so that importing ``search.measuring.timing`` loads no torch.
"""
