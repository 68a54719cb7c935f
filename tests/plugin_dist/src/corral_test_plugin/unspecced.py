"""A hook implementation that matches no specification; corral must refuse it.

Not an entry point: a test registers this module by hand to prove the refusal.
"""

import corral


@corral.hookimpl
def corral_no_such_hook() -> None:
    """Named like a corral hook, but corral declares no such hook."""
