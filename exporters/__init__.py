"""Exporters from torch models (models/) to ONNX."""
