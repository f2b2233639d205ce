"""Training CLI: ``python -m train gpt2`` / ``python -m train vit``."""
