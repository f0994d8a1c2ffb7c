"""Heads on fused features: linear (classification, multi-label) and UPerNet (segmentation)."""
