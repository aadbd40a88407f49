"""The pipeline's stages, one module each; see dvc.yaml for how they connect."""

import os

# oneDNN's CPU kernels for TensorFlow. TF switches them on by default only on CPUs with AVX512-VNNI,
# AVX512-BF16 or AMX; this keeps them on elsewhere too, where they make the training step faster
# (benchmarks/speed.py; docs/results/2026-11-24-training-speed-before-input-fix.md).
# Set before TensorFlow is imported; an explicit TF_ENABLE_ONEDNN_OPTS=0 in the environment wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
