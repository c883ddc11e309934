"""Hardware descriptions: the TOML schema parsed into a HardwareSpec, its cost terms, and the one format rule (what a layer runs as on a target). Imports core."""
