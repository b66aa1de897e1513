"""Triton Inference Server model repositories generated from an export directory (issue 4; not built yet)."""
