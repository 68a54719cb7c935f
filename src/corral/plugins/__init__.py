"""corral's built-in plugins that are not backends: repository, audit and metrics.

Each is registered through the ``corral`` entry point group of corral's own
distribution, uses only the hooks (as a third party's plugin would), reads its own
``[plugins.NAME]`` table and does nothing until that table configures it.
"""
