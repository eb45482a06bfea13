"""Metrics that need samples or models: sample distances, feature FID, image grids and curves."""
