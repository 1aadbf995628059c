"""Training checkpoints (orbax): save, verify and restore train states."""
