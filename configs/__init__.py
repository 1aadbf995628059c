"""The built-in stage configs (`configs/<stage>.py`), installed as `unclip_jax.configs`."""
