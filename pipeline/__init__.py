"""SatDiFuser feature cache: DiffusionSat features extracted once, fused and probed many times."""

__version__ = "0.1.0"
