"""`import corral` stays cheap: no engine client and nothing heavy until it is used."""

from __future__ import annotations

import subprocess
import sys


def test_import_corral_loads_no_engine_client():
    code = (
        "import sys, corral\n"
        "heavy = {'docker', 'podman', 'requests', 'cattrs'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
