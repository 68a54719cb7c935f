"""Suite-wide rules: no third-party plugin autoload, no developer configuration."""

from __future__ import annotations

import os

# The suite must not see plugins the developer happens to have installed; tests that
# are about discovery build their own PluginHost with the environment they want.
os.environ["CORRAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"
# Nor the developer's own settings. (The suite's own variables, from scripts/engines,
# are named CORRALTEST_* so that corral never reads them as settings.)
for name in list(os.environ):
    if name.startswith("CORRAL_") and not name.startswith("CORRAL_DISABLE_PLUGIN"):
        del os.environ[name]

# corral's own test kit, opt-in exactly as a user's suite opts in (fixtures and options;
# the fake backend is registered only by the fake_backend fixture); pytester runs inner
# sessions to test that kit.
pytest_plugins = ["corral.testing", "pytester"]
