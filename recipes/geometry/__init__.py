"""Geometry building blocks for the text-to-3D recipes."""
