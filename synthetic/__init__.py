"""Synthetic multimodal video-QA data (deterministic by seed) for the demo model and calibration."""
