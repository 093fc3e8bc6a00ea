"""Model layer: the one loader (weights, quantization, devices, tokenizer, adapters) and the native Baichuan.

Importing it registers the native Baichuan classes with transformers' Auto classes, so hub Baichuan folders
load with trust_remote_code off.
"""

from component.model.baichuan import register_baichuan

register_baichuan()
