"""Training layer: what every recipe shares (logging, batching, resume, outputs) and each stage's Trainer."""
