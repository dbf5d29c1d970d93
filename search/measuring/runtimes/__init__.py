"""The runtimes latency is measured in: ONNX Runtime (the default), OpenVINO and ExecuTorch.

A runtime is one small class (:mod:`.base`): it loads a model file for the CPU with a pinned
thread count and runs one batch. Timing (:func:`search.measuring.timing.measure`) and everything
above it are the same for all of them; :mod:`.registry` names them and says how to install one
that is missing, :mod:`.files` makes the file a runtime times from a PyTorch model.
"""
