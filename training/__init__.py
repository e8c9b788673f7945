"""vitviz's training backend: datasets, the training loop, fine-tuning and evaluation.

Run it as ``python -m training train|finetune|evaluate ...``. This package imports vitviz core, never the
reverse; importing it stays cheap (no torch or timm at package import).
"""
