"""vgt's built-in plugins. Each package is registered through the ``vgt`` entry-point group, exactly like a
third party's plugin package: its ``__init__`` registers the components (hooks, options, descriptions; no torch,
so that ``vgt --help`` starts fast) and names their classes in ``model``, imported when a component is built."""
