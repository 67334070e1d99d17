"""HOPE network (single-device); see docs/model.md section 1."""
from hope_dist.model.model import Block, HopeModel, build_model, count_parameters, materialize
from hope_dist.model.segments import Segments, document_segments

__all__ = ["Block", "HopeModel", "Segments", "build_model", "count_parameters", "document_segments", "materialize"]
