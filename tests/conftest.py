"""Suite-wide rules: no third-party plugin autoload, no developer configuration."""

from __future__ import annotations

import os

# The suite must not see plugins the developer happens to have installed; tests that
# are about discovery build their own PluginHost with the environment they want.
os.environ["CORRAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"
for name in [
    n for n in os.environ if n.startswith("CORRAL_") and n != "CORRAL_DISABLE_PLUGIN_AUTOLOAD"
]:
    del os.environ[name]
