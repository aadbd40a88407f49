"""The pipeline's stages, one module each; see dvc.yaml for how they connect."""

import os

# oneDNN's CPU kernels for TensorFlow. TF switches them on by default only on CPUs with AVX512-VNNI,
# AVX512-BF16 or AMX (this project's 2-core AMD EPYC VM has the first two, so they are on here anyway);
# this keeps them on elsewhere too. They made our training step ~1.46x faster (benchmarks/speed.py).
# Set before TensorFlow is imported; an explicit TF_ENABLE_ONEDNN_OPTS=0 in the environment wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
