"""Fusers of cached UNet features: the bottleneck projection and the GW, LW and MoE fusers."""
