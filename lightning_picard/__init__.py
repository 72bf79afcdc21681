"""lightning_picard."""
