"""Task recipes (TOML), shipped as package data; read them with ``kvcompile.recipe``."""
