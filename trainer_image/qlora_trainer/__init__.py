"""The QLoRA trainer: the program a QLoRAJob's pod runs (see sft.py for the whole run)."""
