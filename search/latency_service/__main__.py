"""``python -m search.latency_service``: the latency target with nothing but onnxruntime and numpy installed."""

import argparse
import sys

from search.latency_service.service import add_arguments, serve

parser = argparse.ArgumentParser(
    prog="python -m search.latency_service", description="Time ONNX models on this device for prune-search searches."
)
add_arguments(parser)
sys.exit(serve(parser.parse_args()))
