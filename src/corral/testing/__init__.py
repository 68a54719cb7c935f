"""What users and plugin authors test with: a fake backend, the conformance suite, fixtures.

Nothing here loads by itself. In a conftest.py, ``pytest_plugins = ["corral.testing"]``
(or ``["corral.testing.pytest_plugin"]``) adds the fixtures and options; the backend
conformance suite is ``corral.testing.conformance.BackendConformance``.
"""

from __future__ import annotations

import sys

from .fake import FakeBackend, fake_of

__all__ = ["FakeBackend", "fake_of"]

# Loading this package as a pytest plugin loads the fixtures with it.
pytest_plugins = ["corral.testing.pytest_plugin"]

# Under pytest, failed assertions in the suite and fixtures show their values, as they
# would in the user's own test files (pytest only rewrites modules it is told about).
_pytest = sys.modules.get("pytest")
if _pytest is not None:
    _pytest.register_assert_rewrite("corral.testing.conformance", "corral.testing.pytest_plugin")
