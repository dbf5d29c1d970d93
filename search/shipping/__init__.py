"""From a chosen trial to files a user ships: ``rebuild`` (the pruned model from the study's
baseline and the trial's history), ``export`` (rebuild -> fine-tune -> check -> write), ``checks``
(ONNX Runtime against PyTorch, INT8 against FP32), ``model_file`` (the pruned model file and its
loader), ``card`` (the model card and the dashboard's artifacts) and ``settings``.
"""
