"""Shipped YAML profiles (data only): cpu (default), premerge, h200, and the one-GPU
device checks gpu1-nccl and gpu2-gloo-cuda (bench/gpu_check.sh)."""
