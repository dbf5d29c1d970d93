"""Training in PyTorch: ``finetune`` (BatchNorm recalibration and SGD fine-tuning, with optional
distillation), ``evaluate`` (top-1 of a PyTorch model, or of ONNX models in ONNX Runtime) and
``baseline`` (adopt the user's weights, or train and cache a baseline).
"""
