"""vgt's built-in plugins. Each module is registered through the ``vgt`` entry-point group, exactly like a
third party's plugin package."""
