"""Exports of (pruned) models to runtimes outside PyTorch."""
