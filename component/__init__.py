"""LLM_training's library: one concern per module (see README.md, "Layout")."""
