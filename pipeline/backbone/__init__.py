"""DiffusionSat: loading, layer hooks and inversion schedule."""
