"""Inference layer: the generation engine, chat, compare and its reports, reward scoring."""
