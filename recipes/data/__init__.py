"""Camera data for the recipes: the shared camera type, random training cameras, turntables, reference views."""

from recipes.data.cameras import Cameras, look_at, orbit_cameras

__all__ = ["Cameras", "look_at", "orbit_cameras"]
