"""llm-sandbox as an external reference, where it is installed (``pip install llm-sandbox``).

Our test image is busybox only (no Python), so what is measured is what llm-sandbox can
do with it: a session opened, ``execute_command("true")`` run and closed, against
corral's full cycle. ``skip_environment_setup=True`` (there is no pip to set up) and a
``sleep`` command (the image has none of its own). "defaults" keeps llm-sandbox's close,
which stops the container with a 10 s grace (busybox's sleep as PID 1 ignores SIGTERM);
"tuned" sets the stop signal to SIGKILL. On local, its bubblewrap backend runs the
host's Python, so a one-line program is run as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import measure
from common import RAW_LABEL, Config, Row, interleave, row, timed
from sides import Side

NAME = "llm-sandbox"


def _missing(backend: str) -> Row | None:
    try:
        import llm_sandbox  # noqa: F401
    except ImportError as e:
        return Row(
            backend,
            "llm-sandbox session",
            None,
            None,
            NAME,
            note=f"not measured: llm-sandbox is not installed ({e}); pip install llm-sandbox",
        )
    return None


def _engine_session(backend: str, config: Config, client: Any, tuned: bool) -> Any:
    from llm_sandbox import SandboxSession

    runtime: dict[str, Any] = {
        "command": ["sleep", "3600"],
        "labels": {RAW_LABEL: config.run_id},
        "network_mode": "none",
    }
    if tuned:  # Docker takes the name, Podman's REST API the number
        runtime["stop_signal"] = "SIGKILL" if backend == "docker" else 9
    return SandboxSession(
        backend=backend,
        client=client,
        image=config.image,
        skip_environment_setup=True,
        runtime_configs=runtime,
    )


def _session_cycle(make: Callable[[], Any]) -> Callable[[], float]:
    def one() -> float:
        started = time.perf_counter()
        session = make()
        session.open()
        try:
            result = session.execute_command("true")
            if result.exit_code != 0:
                raise RuntimeError(f"llm-sandbox: true exited {result.exit_code}")
        finally:
            session.close()
        return time.perf_counter() - started

    return one


def engine_rows(
    backend: str, config: Config, ours: Side, raw: Any, plan: measure.Plan
) -> list[Row]:
    missing = _missing(backend)
    if missing:
        return [missing]
    rows = []
    name = "full cycle vs llm-sandbox open + execute_command('true') + close"
    try:
        tuned = _session_cycle(lambda: _engine_session(backend, config, raw.client, True))
        seconds = interleave(plan.rounds, lambda: timed(ours.cycle), tuned)
        rows.append(row(backend, f"{name} (tuned: SIGKILL stop)", seconds, NAME))
        if not config.quick:
            default = _session_cycle(lambda: _engine_session(backend, config, raw.client, False))
            seconds = interleave(1, lambda: timed(ours.cycle), default)
            rows.append(
                row(
                    backend,
                    f"{name} (defaults, 1 round)",
                    seconds,
                    NAME,
                    note="its close stops with the 10 s grace",
                )
            )
    except Exception as e:
        rows.append(
            Row(
                backend, name, None, None, NAME, note=f"llm-sandbox failed: {type(e).__name__}: {e}"
            )
        )
    return rows


def local_rows(ours: Side, bwrap: str, plan: measure.Plan) -> list[Row]:
    """llm-sandbox's bubblewrap backend (runs as the caller: root here, no host user)."""
    missing = _missing("local")
    if missing:
        return [missing]
    from llm_sandbox import SandboxSession

    def session() -> Any:
        return SandboxSession(
            backend="bubblewrap", bwrap_path=bwrap, lang="python", skip_environment_setup=True
        )

    rows = []
    try:
        seconds = interleave(plan.rounds, lambda: timed(ours.cycle), _session_cycle(session))
        rows.append(
            row(
                "local",
                "full cycle vs llm-sandbox open + execute_command('true') + close (bubblewrap)",
                seconds,
                NAME,
            )
        )
        mine, theirs = ours.create(), session()
        theirs.open()
        try:
            seconds = interleave(
                plan.rounds * 2,
                lambda: timed(lambda: ours.exec_true(mine)),
                lambda: timed(lambda: theirs.execute_command("true")),
            )
            rows.append(
                row(
                    "local", "exec round trip vs llm-sandbox execute_command('true')", seconds, NAME
                )
            )
            run_once = timed(lambda: theirs.run("print(1)"))
            rows.append(
                Row(
                    "local",
                    "llm-sandbox run('print(1)') (Python in bwrap)",
                    None,
                    run_once * 1000,
                    NAME,
                    note="1 round; corral has no run(code)",
                )
            )
        finally:
            ours.destroy(mine)
            theirs.close()
    except Exception as e:
        rows.append(
            Row(
                "local",
                "llm-sandbox (bubblewrap)",
                None,
                None,
                NAME,
                note=f"llm-sandbox failed: {type(e).__name__}: {e}",
            )
        )
    return rows
