"""Export layer: from a trained output folder to a standalone model (merge)."""
