"""Built-in plugins, one module per method: ``mmtoken.plugins.<name>``."""
