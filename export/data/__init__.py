"""Reading interaction logs and turning them into per-user sequences."""
