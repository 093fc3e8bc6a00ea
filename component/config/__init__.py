"""Settings layer: the one parser of every entry point, the choice lists, and the settings dataclasses per
concern (training, generation, inference front ends, export). Imports nothing heavier than the standard
library, except `training`, which builds transformers' TrainingArguments."""
