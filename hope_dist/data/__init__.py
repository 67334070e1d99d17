"""Training data: Megatron indexed datasets -> seeded, blended, resumable, dp-sliced batches.

Also what data_prep (the tokenizing CLI above this package) and the evals share: the Megatron
format (megatron_format.py), the tokenizer engines (encoders.py) and document readers (readers.py)."""

from hope_dist.data.stream import TrainStream, build_train_stream

__all__ = ["TrainStream", "build_train_stream"]
