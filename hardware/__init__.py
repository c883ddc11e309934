"""The hardware descriptions shipped with fxmpq (TOML package data, installed as fxmpq.hardware_specs)."""
