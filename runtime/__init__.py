"""Torch-free serving side of CREMA: numpy, OpenCV, ONNX Runtime and tokenizers only (DESIGN rule 2)."""
