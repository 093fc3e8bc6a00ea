"""LLM_training's library, in layers (docs/architecture.md): config -> data, model -> train, inference, export.

Each subpackage is one layer and each module one concern; import-linter (pyproject.toml) keeps imports going
downward only.
"""
