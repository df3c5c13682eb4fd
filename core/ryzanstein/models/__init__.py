"""Model store (on-disk catalog), loaders (HF folders, GGUF import) and the default model."""
