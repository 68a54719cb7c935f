"""corral's core: the model, the plugin host and the Sandbox. No engine client here."""
