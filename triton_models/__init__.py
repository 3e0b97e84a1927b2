"""Triton Inference Server deployment: repository generator, python models, server launcher, client."""
