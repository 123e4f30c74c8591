"""Backbones, embedding heads, ONNX export and the runtime embedder."""
