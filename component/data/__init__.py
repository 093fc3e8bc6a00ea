"""Data layer: canonical records, readers, the prompt template, the shared pipeline, encoders and collators."""
