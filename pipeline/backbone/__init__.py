"""DiffusionSat: loading, layer hooks, inversion schedule and feature extraction."""
