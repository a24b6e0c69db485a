"""Training configs: one `get_config()` per file, each overriding `default.py`."""
