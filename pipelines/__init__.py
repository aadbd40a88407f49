"""The pipeline's stages, one module each; see dvc.yaml for how they connect."""

import os

# oneDNN's CPU kernels for TensorFlow. TF switches them on by default only on CPUs with AVX-512 or
# AMX; on this project's AVX2 machine they made the training step ~1.25x faster (benchmarks/speed.py).
# Set before TensorFlow is imported; an explicit TF_ENABLE_ONEDNN_OPTS=0 in the environment wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
