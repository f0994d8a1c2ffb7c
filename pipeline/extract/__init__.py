"""Extraction: the reference's features of a batch, the run of a task's splits into their caches, its ranks, and fills."""
