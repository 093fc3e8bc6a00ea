"""LLM_training's library: one concern per module (see README.md, "Layout").

Importing the package registers the native Baichuan classes with transformers' Auto classes, so hub
Baichuan folders load with trust_remote_code off.
"""

from component.baichuan import register_baichuan

register_baichuan()
