"""Probing: the probe map over a cache's cells, on this machine or a Dask cluster, and the probe run."""
