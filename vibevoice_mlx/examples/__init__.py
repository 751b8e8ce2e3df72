"""Examples a user can copy: run them with `python -m vibevoice_mlx.examples.<name>`."""
