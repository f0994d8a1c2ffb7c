"""Fitting: the training loop, the fit run with its feature sources, its resumable state and its grid."""
