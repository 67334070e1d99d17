"""Training data: Megatron indexed datasets -> seeded, blended, resumable, dp-sliced batches."""

from hope_dist.data.stream import TrainStream, build_train_stream

__all__ = ["TrainStream", "build_train_stream"]
