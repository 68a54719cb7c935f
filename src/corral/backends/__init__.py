"""Built-in backends; each registers through the ``corral`` entry point group."""
