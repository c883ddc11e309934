"""Foundations every stage may use: atomic files, checkpoints, JSON and TOML reading, tables, dominance, the quantization primitives, batches, devices, datasets. Imports only fxmpq.errors."""
