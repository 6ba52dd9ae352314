"""DaMoC."""
