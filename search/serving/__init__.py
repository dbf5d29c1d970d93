"""Exported models answering requests (``cli.py serve``): ``models`` (an export's card and ONNX file
in one shared session), ``baseline`` (the study's unpruned model beside them), ``upload`` (the byte
cap and multipart, in memory), ``images`` (decoding and its limits), ``preprocess`` (the card's
steps, without torch), ``app`` and ``schema`` (the page and the JSON API), and ``load`` (a bounded
concurrent load, for the tests and the benchmark).
"""
