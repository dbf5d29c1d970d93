"""``python -m search.target``: the latency target with nothing but onnxruntime and numpy installed."""

import argparse
import sys

from search.target.service import add_arguments, serve

parser = argparse.ArgumentParser(
    prog="python -m search.target", description="Time ONNX models on this device for prune-search searches."
)
add_arguments(parser)
sys.exit(serve(parser.parse_args()))
