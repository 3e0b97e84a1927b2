"""PyTorch reference -> ONNX graphs per stage (runtime/specs.py), written as a verified artifact directory."""
