"""Pruning-policy search for image-classification CNNs under a measured CPU latency budget."""

from __future__ import annotations

__version__ = "0.1.0"
