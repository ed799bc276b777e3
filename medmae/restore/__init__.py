"""Slice repair and denoising: corruption simulation, corrupted-slice detection, ``--slices`` parsing."""
