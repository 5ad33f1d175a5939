"""QoQ, offline: calibration, rotation, smoothing, reordering, clipping, GPTQ, the pipeline."""
