"""Tasks: GEO-Bench reading and the embedded demo."""
