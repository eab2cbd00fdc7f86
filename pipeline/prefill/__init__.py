"""Prefill: the prefill engines, the incremental split, the Spark job and its logging."""
