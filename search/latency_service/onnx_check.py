"""What the latency target accepts: a self-contained ONNX model, checked without the onnx package.

A client uploads model bytes, and ONNX can make a model read files on the device: a tensor
whose ``data_location`` is ``EXTERNAL`` names a file to load its weights from. The target runs
only models that carry all their data. This walks the model's protobuf wire format (ModelProto
-> graphs, nodes, attributes, functions -> tensors) and refuses any tensor stored externally; it
needs no more than the standard library, so it runs where only onnxruntime and numpy are
installed. Custom-op libraries cannot be loaded at all: the client sends no session options.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["ModelRejected", "check_self_contained", "check_upload"]

# Field numbers of onnx.proto3 (https://github.com/onnx/onnx/blob/main/onnx/onnx.proto).
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto.initialization, .algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_FUNCTION_NODE = 7
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_EXTERNAL = 1
_MAX_DEPTH = 64


class ModelRejected(ValueError):
    """The upload is not a self-contained ONNX model (the message says why)."""


def check_upload(data: bytes, runtime: str) -> None:
    """Raise :class:`ModelRejected` unless ``data`` is a model file ``runtime`` times.

    ONNX Runtime and OpenVINO time ONNX models (checked by :func:`check_self_contained`; OpenVINO's
    ONNX reader follows external data as ONNX Runtime does). ExecuTorch times ``.pte`` programs,
    which name no files: checked by their flatbuffer identifier, the rest by ExecuTorch's loader.
    """
    if runtime != "executorch":
        check_self_contained(data)
    elif len(data) < 8 or data[4:6] != b"ET":
        raise ModelRejected("not an ExecuTorch program (.pte); this target times in executorch")


def check_self_contained(data: bytes) -> None:
    """Raise :class:`ModelRejected` unless ``data`` parses as a ModelProto with no external data."""
    if not data:
        raise ModelRejected("the upload is empty")
    view = memoryview(data)
    try:
        graphs = [value for number, value in _fields(view) if number == _MODEL_GRAPH]
        functions = [value for number, value in _fields(view) if number == _MODEL_FUNCTIONS]
        if not graphs:
            raise ModelRejected("not an ONNX model (no graph)")
        for info in (value for number, value in _fields(view) if number == _MODEL_TRAINING_INFO):
            graphs += [value for number, value in _fields(info) if number in _TRAINING_GRAPHS]
        for graph in graphs:
            _check_graph(graph, 0)
        for function in functions:
            for number, node in _fields(function):
                if number == _FUNCTION_NODE:
                    _check_node(node, 0)
    except _Malformed as exc:
        raise ModelRejected(f"not an ONNX model ({exc})") from None


class _Malformed(Exception):
    pass


def _check_graph(graph: memoryview, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ModelRejected("graphs nested too deeply")
    for number, value in _fields(graph):
        if number == _GRAPH_INITIALIZER:
            _check_tensor(value)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _check_sparse(value)
        elif number == _GRAPH_NODE:
            _check_node(value, depth)


def _check_node(node: memoryview, depth: int) -> None:
    for number, attribute in _fields(node):
        if number != _NODE_ATTRIBUTE:
            continue
        for field, value in _fields(attribute):
            if field in (_ATTR_T, _ATTR_TENSORS):
                _check_tensor(value)
            elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
                _check_sparse(value)
            elif field in (_ATTR_G, _ATTR_GRAPHS):
                _check_graph(value, depth + 1)


def _check_sparse(sparse: memoryview) -> None:
    for number, value in _fields(sparse):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _check_tensor(value)


def _check_tensor(tensor: memoryview) -> None:
    for number, value in _fields(tensor, varints=True):
        if number == _TENSOR_EXTERNAL_DATA or (number == _TENSOR_DATA_LOCATION and value == _EXTERNAL):
            raise ModelRejected("the model stores weights in external data files; export it with all data inside")


def _fields(buf: memoryview, *, varints: bool = False) -> Iterator[tuple[int, object]]:
    """``(field number, value)`` of each field: sub-messages as memoryviews, varints as ints if asked."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            if varints:
                yield number, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _Malformed("truncated")
            if not varints:
                yield number, buf[pos : pos + length]
            elif number == _TENSOR_EXTERNAL_DATA:
                yield number, None
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed(f"wire type {wire}")
        if number == 0 or pos > end:
            raise _Malformed("bad field")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
