"""INT8 calibration: stage inputs from real data, ORT static/dynamic quantization, TensorRT tables, fidelity."""
