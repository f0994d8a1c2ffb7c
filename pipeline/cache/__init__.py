"""The feature cache: Zarr layout, writer, reader, info and verify."""
