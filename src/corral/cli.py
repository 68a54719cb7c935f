"""The ``corral`` command: run commands in sandboxes, and inspect and clean up what corral made."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import platform
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import Any, NoReturn

import attrs

import corral
from corral.core import options as option_table
from corral.core import settings as settings_module
from corral.core.backend import Availability
from corral.core.lifecycle import select_backend_name
from corral.core.plugins import get_host
from corral.core.spec import ExecRequest

# Exit statuses of `run` and `exec`, as `docker run` and GNU `timeout` use them, so that a
# script can tell the command's own failure from corral's.
EXIT_TIMEOUT = 124
EXIT_CORRAL_FAILED = 125
EXIT_OOM = 137
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a program killed by SIGPIPE
# Every other command fails with 1, and a usage error is 2, as most tools do.
EXIT_FAILURE = 1
EXIT_USAGE = 2

# The commands that take a command line of their own after "--".
COMMAND_VERBS = ("run", "exec")
# The commands that exit with their command's status (corral's own failure is 125).
STATUS_VERBS = (*COMMAND_VERBS, "shell")
# What a terminal session keeps of its output (the keeper's cap) unless --max-output
# says: a session prints far more than a captured command, and past the cap it would
# go silent.
SESSION_OUTPUT = "256MiB"

Args = argparse.Namespace
Command = Callable[[Args], int]


# -- small output helpers ----------------------------------------------------------------


def _say(message: str) -> None:
    print(f"corral: {message}", file=sys.stderr)


def _progress(message: str) -> None:
    # Progress is for a person watching; a pipe or a log file gets only the real output.
    if sys.stderr.isatty():
        _say(message)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip())


def _span(seconds: float) -> str:
    """A rough, short length of time: 42s, 5m, 3h, 2d."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _ago(timestamp: float, now: float) -> str:
    if timestamp <= 0:  # not known (a cluster sandbox whose node is lost)
        return "-"
    return f"{_span(now - timestamp)} ago"


def _until(timestamp: float, now: float) -> str:
    if timestamp <= 0:
        return "-"
    return f"in {_span(timestamp - now)}" if timestamp > now else f"expired {_ago(timestamp, now)}"


def _size(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor:
            return f"{value / factor:.1f}{unit}"
    return f"{value}B"


def _detach(sandbox: corral.Sandbox) -> None:
    """Let go of a handle while the sandbox lives on (``--keep``, ``exec``, ``stats``)."""
    sandbox.detach()


# -- running commands ----------------------------------------------------------------------


def _exit_status(result: corral.ExecResult) -> int:
    """The status `corral run` exits with for a command that ended this way."""
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.oom_killed:
        return EXIT_OOM
    if result.signal:
        return 128 + result.signal
    if result.exit_code < 0:  # killed by a signal, told the way subprocess tells it
        return 128 - result.exit_code
    return min(result.exit_code, 255)


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    """Repeated ``K=V`` options as a mapping; the core checks the names themselves."""
    if not items:
        return None
    pairs = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise corral.ConfigError(flag, f"{item!r} is not K=V")
        pairs[key] = value
    return pairs


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float}


def _add_flags(
    parser: argparse.ArgumentParser, table: Sequence[option_table.Option], skip: Sequence[str] = ()
) -> None:
    """The flags of the options in ``table`` that have one (options.py), but ``skip``."""
    for option in table:
        flag = option.flag
        if flag is None or option.name in skip:
            continue
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": option.help}
        if flag.metavar is not None:
            kwargs["metavar"] = flag.metavar
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        if flag.kind in ("list", "pairs"):
            kwargs["action"] = "append"
        elif flag.kind == "switch":
            kwargs["action"] = "store_true"
        elif flag.kind in _FLAG_TYPES:
            kwargs["type"] = _FLAG_TYPES[flag.kind]
        parser.add_argument(*flag.names, **kwargs)


def _flag_values(
    args: Args,
    table: Sequence[option_table.Option],
    skip: Sequence[str] = (),
    *,
    read_stdin: bool = True,
) -> dict[str, Any]:
    """The keywords the flags of ``table`` give (None where absent), as ``_add_flags``
    added them. ``--interactive`` reads our standard input to its end, unless
    ``read_stdin`` is False (a terminal session copies it as it comes instead)."""
    values: dict[str, Any] = {}
    for option in table:
        flag = option.flag
        if flag is None or option.name in skip:
            continue
        value = getattr(args, flag.dest)
        if flag.kind == "pairs":
            value = _pairs(value, flag.names[0])
        elif flag.kind == "switch":
            if option.name == "stdin":
                value = sys.stdin.buffer.read() if value and read_stdin else None
            else:
                value = True if value else None
        values[option.name] = value
    return values


def _exec_options(args: Args, *, for_exec: bool, read_stdin: bool = True) -> dict[str, Any]:
    """The keywords of ``Sandbox.exec`` and ``Sandbox.stream`` that the options set;
    for `run`, those the sandbox does not take instead (its env, workdir and user)."""
    skip = () if for_exec else option_table.names(option_table.CREATE)
    return _flag_values(args, option_table.EXEC, skip, read_stdin=read_stdin)


def _sandbox_options(args: Args, settings: corral.Settings) -> dict[str, Any]:
    """The keywords of ``corral.create`` that `run`'s options set."""
    values = _flag_values(args, option_table.CREATE)
    values["security"] = _allowing(settings, values["security"])
    return values


def _check_command(args: Args) -> None:
    # The command, timeout and output cap are checked by the same model the core uses,
    # before a sandbox is made for a command that could never run.
    ExecRequest(
        argv=args.command,
        timeout=args.timeout,
        **({} if args.max_output is None else {"max_output": args.max_output}),
    )


def _stream(
    sandbox: corral.Sandbox, argv: Sequence[str], options: dict[str, Any]
) -> corral.ExecResult:
    """Copy the command's output to ours as it comes; the result at the end."""
    outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    # closing(): leaving early (Ctrl-C, a closed pipe) stops the command at once.
    with closing(sandbox.stream(argv, **options)) as events:
        for event in events:
            if isinstance(event, corral.ExecResult):
                return event
            output = outputs[event.stream]
            output.write(event.data)
            output.flush()
    raise corral.InternalError("the command's output ended without a result", sandbox_id=sandbox.id)


def _result_json(
    result: corral.ExecResult, *, backend: str, sandbox_id: str | None = None
) -> dict[str, Any]:
    answer = {
        "exit_code": result.exit_code,
        "stdout": result.text,
        "stderr": result.stderr_text,
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "oom_events": result.oom_events,
        "truncated": result.truncated,
        "signal": result.signal,
        "duration": result.duration,
        "backend": backend,
    }
    if sandbox_id is not None:  # `run` removed its sandbox: no id worth keeping
        answer["sandbox_id"] = sandbox_id
    return answer


def _run_in(
    sandbox: corral.Sandbox,
    args: Args,
    options: dict[str, Any],
    ports: dict[int, str] | None = None,
) -> int:
    if args.json:
        result = sandbox.exec(args.command, **options)
        answer = _result_json(result, backend=sandbox.backend_name, sandbox_id=sandbox.id)
        if ports:
            answer["ports"] = {str(port): address for port, address in ports.items()}
        _print_json(answer)
    else:
        result = _stream(sandbox, args.command, options)
    return _finish(result, args)


def _finish(result: corral.ExecResult, args: Args) -> int:
    if result.truncated and not args.json:
        _say(
            "output past the max_output setting was dropped "
            "(raise it in corral.toml or with CORRAL_MAX_OUTPUT)"
        )
    if result.timed_out and not args.json:
        _say(_stopped_by(result, args))
    return _exit_status(result)


def _seconds(value: str | None) -> str | None:
    """A duration option as we show it back ("2m" -> "120s"); None when not given."""
    if value is None:
        return None
    from corral.core.units import parse_duration

    return f"{parse_duration(value):g}s"


def _stopped_by(result: corral.ExecResult, args: Args) -> str:
    """Which limit stopped the command, in one line (``ExecResult.timed_out_by``)."""
    why = result.timed_out_by
    if why == "idle_timeout":
        idle = _seconds(getattr(args, "idle_timeout", None))
        return f"stopped: no output for {idle or 'too long'} (idle timeout)"
    if why == "lifetime":
        return "stopped: the sandbox's lifetime ended"
    if why == "cputime":
        return "stopped: the command used up its CPU time (cputime limit)"
    timeout = _seconds(getattr(args, "timeout", None))
    return f"timed out after {timeout}" if timeout else "timed out"


def cmd_run(args: Args) -> int:
    """Run a command in a fresh sandbox, stream its output, then remove the sandbox.

    Exits with the command's status: 124 when it timed out, 137 when it was killed
    for memory, 125 when corral itself failed.
    """
    _check_command(args)
    terminal = _terminal_of(args)
    settings = corral.load_settings()
    options = _exec_options(args, for_exec=False, read_stdin=terminal is None)
    sandbox_keywords: dict[str, Any] = {
        "backend": args.backend,
        **_sandbox_options(args, settings),
        "settings": settings,
    }
    if terminal is not None or sandbox_keywords["ports"]:
        # The sandbox first: the command gets a terminal, or the ports are said
        # before the command (a server, say) runs.
        return _run_in_made(args, options, sandbox_keywords, terminal)
    if not args.keep:
        # One call: the sandbox is made, runs the command and is removed however the
        # command ends, Ctrl-C included.
        _progress("running in a fresh sandbox")
        if args.json:
            result = corral.run(args.command, **options, **sandbox_keywords)
            _print_json(_result_json(result, backend=_backend_name(args, settings)))
        else:
            result = _run_streaming(args, options, sandbox_keywords)
        return _finish(result, args)
    _progress("creating a sandbox")
    sandbox = corral.create(**sandbox_keywords)
    _detach(sandbox)
    try:
        return _run_in(sandbox, args, options)
    finally:
        _say(f"kept sandbox {sandbox.id}")


def _run_in_made(
    args: Args, options: dict[str, Any], sandbox_keywords: dict[str, Any], terminal: int | None
) -> int:
    """`run` in a sandbox made first (a terminal session, published ports), removed
    after unless --keep."""
    _progress("creating a sandbox")
    sandbox = corral.create(**sandbox_keywords)
    try:
        ports = _published(sandbox)
        _say_ports(sandbox, ports, args)
        if terminal is not None:
            return _session(sandbox, args.command, options, args, terminal)
        return _run_in(sandbox, args, options, ports)
    finally:
        if args.keep:
            _detach(sandbox)
            _say(f"kept sandbox {sandbox.id}")
        else:
            sandbox.close()


def _published(sandbox: corral.Sandbox) -> dict[int, str]:
    """Each published port of the sandbox and the ``host:port`` it is reached at."""
    found = {}
    for port in sandbox.spec.ports:
        host, host_port = sandbox.port(port)
        found[port] = f"{host}:{host_port}"
    return found


def _say_ports(sandbox: corral.Sandbox, ports: dict[int, str], args: Args) -> None:
    if args.json:
        return  # said in the JSON answer instead
    for port, address in ports.items():
        _say(f"port {port} of sandbox {sandbox.id} is published at {address}")


def _allowing(settings: corral.Settings, names: list[str] | None) -> dict[str, Any] | None:
    """The security keyword for ``--allow-unsafe``: the settings' opt-ins plus these."""
    if not names:
        return None
    security = settings.sandbox.get("security") or {}
    return {"allow_unsafe": [*security.get("allow_unsafe", ()), *names]}


def _backend_name(args: Args, settings: corral.Settings) -> str:
    return select_backend_name(args.backend, settings)


def _run_streaming(
    args: Args, options: dict[str, Any], sandbox_keywords: dict[str, Any]
) -> corral.ExecResult:
    """``corral.run`` with the command's output copied to ours as it comes; a closed
    pipe on our side stops the command and ends corral as a closed pipe would."""
    outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    lock = threading.Lock()  # on_chunk may be called from a backend's threads
    stop = threading.Event()

    def show(chunk: corral.OutputChunk) -> None:
        with lock:
            try:
                outputs[chunk.stream].write(chunk.data)
                outputs[chunk.stream].flush()
            except BrokenPipeError:
                stop.set()

    result = corral.run(args.command, on_chunk=show, cancel=stop, **options, **sandbox_keywords)
    if stop.is_set():
        raise BrokenPipeError
    return result


def cmd_exec(args: Args) -> int:
    """Run a command in an existing sandbox and stream its output; the sandbox stays.

    With -it, the command gets a terminal and ours is connected to it (raw mode, its
    size followed), as `docker exec -it`.
    """
    _check_command(args)
    terminal = _terminal_of(args)
    settings = corral.load_settings()
    options = _exec_options(args, for_exec=True, read_stdin=terminal is None)
    sandbox = corral.attach(args.id, backend=args.backend, settings=settings)
    _detach(sandbox)
    if terminal is not None:
        return _session(sandbox, args.command, options, args, terminal)
    return _run_in(sandbox, args, options)


def cmd_shell(args: Args) -> int:
    """Open a shell in a sandbox on our terminal: its $SHELL, else /bin/sh (exec -it).

    Exits with the shell's status.
    """
    args.tty, args.interactive, args.json = True, True, False
    terminal = _terminal_of(args)
    assert terminal is not None  # -i is implied, and a missing terminal refused
    options = _exec_options(args, for_exec=True, read_stdin=False)
    sandbox = corral.attach(args.id, backend=args.backend, settings=corral.load_settings())
    _detach(sandbox)
    shell = sandbox.spec.env.get("SHELL") or "/bin/sh"
    return _session(sandbox, [shell], options, args, terminal)


# -- terminal sessions (-t) ------------------------------------------------------------------


def _terminal_of(args: Args) -> int | None:
    """The file descriptor of our terminal for -t (None without -t); refused, as
    `docker run -t` does, when there is none: our input with -i, else input or output."""
    if not getattr(args, "tty", False):
        return None
    if args.json:
        _refuse(args, "--json cannot be used with -t (the output goes to the terminal)")
    if args.interactive:
        if not os.isatty(0):
            needs = (
                "corral shell needs its standard input to be a terminal"
                if args.verb == "shell"
                else "-t needs corral's standard input to be a terminal "
                "(drop -t to send piped input with -i)"
            )
            _refuse(args, f"the input device is not a TTY: {needs}")
        return 0
    for fd in (0, 1):
        if os.isatty(fd):
            return fd
    _refuse(args, "-t needs a terminal, and neither our input nor our output is one")


def _refuse(args: Args, message: str) -> NoReturn:
    """A usage error of the command being run (its own exit status)."""
    parser: _Parser = args.parser
    parser.error(message)


def _session(
    sandbox: corral.Sandbox,
    argv: Sequence[str],
    options: dict[str, Any],
    args: Args,
    terminal: int,
) -> int:
    """Run ``argv`` on a terminal of the sandbox's, connected to ours: its output to our
    stdout, and with -i our keys to it (raw mode: Ctrl-C is a byte for the command) and
    our window size, followed on SIGWINCH. Our terminal is restored however it ends; a
    command still running when we leave (SIGTERM, a closed terminal) is killed."""
    import termios
    import tty

    options = {key: value for key, value in options.items() if key != "stdin"}
    if options.get("max_output") is None:
        options["max_output"] = SESSION_OUTPUT
    process = sandbox.spawn(argv, tty=True, **options)
    forward = bool(args.interactive)
    saved = termios.tcgetattr(terminal) if forward else None
    resize = threading.Event()
    resize.set()  # the first size goes before any input
    stop = threading.Event()
    # Only the main thread may set a handler; elsewhere the first size is all it gets.
    follow = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGWINCH, lambda *_: resize.set()) if follow else None
    pump = threading.Thread(
        target=_pump_terminal,
        args=(process, terminal, forward, resize, stop),
        name="corral-terminal",
        daemon=True,
    )
    result = None
    try:
        if saved is not None:
            tty.setraw(terminal, termios.TCSANOW)
        pump.start()
        out = sys.stdout.buffer
        for chunk in process.output():
            out.write(chunk.data)
            out.flush()
        result = process.wait()
    finally:
        stop.set()
        if result is None:  # we leave first: nobody would see the command any more
            with contextlib.suppress(corral.SandboxError):
                process.kill()
        if pump.is_alive():
            pump.join(timeout=2)
        if follow:
            signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(terminal, termios.TCSADRAIN, saved)
    return _finish(result, args)


def _pump_terminal(
    process: corral.Process,
    terminal: int,
    forward: bool,
    resize: threading.Event,
    stop: threading.Event,
) -> None:
    """In a thread: our window size to the process when it changes (``resize``), and,
    with ``forward``, our input to it as it comes, once its first size is set (so a
    command that reads before asking its size sees the right one)."""
    import select

    sized = False
    attempts = 0
    while not stop.is_set():
        if resize.is_set():
            resize.clear()
            try:
                size = os.get_terminal_size(terminal)
                process.resize(size.lines, size.columns)
                sized = True
            except (corral.NotFoundError, corral.ConflictError):
                # Its exec may not run yet: again in a moment, for a while.
                attempts += 1
                sized = attempts >= 100
                if not sized:
                    resize.set()
            except (corral.SandboxError, OSError):
                sized = True  # no size to give: the input still goes
        if not forward or not sized:
            stop.wait(0.05)
            continue
        try:
            ready, _, _ = select.select([terminal], [], [], 0.1)
            if not ready:
                continue
            data = os.read(terminal, 65536)
            if not data:  # our terminal is gone
                process.close_stdin()
                return
            process.write(data)
        except (corral.SandboxError, OSError):
            return  # the process ended (its output loop says how)


# -- sandboxes -------------------------------------------------------------------------------


def cmd_create(args: Args) -> int:
    """Create a sandbox that stays, and print its id.

    corral rm (or the end of its lifetime) removes it. Published ports (-p) are said on
    stderr with the address each is reached at (in the JSON answer with --json).
    """
    settings = corral.load_settings()
    sandbox = corral.create(
        backend=args.backend, **_sandbox_options(args, settings), settings=settings
    )
    try:
        ports = _published(sandbox)
    except BaseException:
        sandbox.close()  # an id we could not answer with must not stay behind
        raise
    _detach(sandbox)
    if args.json:
        _print_json(
            {
                "sandbox_id": sandbox.id,
                "backend": sandbox.backend_name,
                "expires": sandbox.expires,
                "ports": {str(port): address for port, address in ports.items()},
            }
        )
        return 0
    print(sandbox.id)
    _say_ports(sandbox, ports, args)
    return 0


def cmd_ls(args: Args) -> int:
    """List the sandboxes corral made on a backend."""
    infos = sorted(
        corral.list(backend=args.backend, settings=corral.load_settings()),
        key=lambda info: info.created,
    )
    if args.json:
        _print_json([attrs.asdict(info) for info in infos])
        return 0
    now = time.time()
    rows: list[tuple[str, ...]] = [
        (
            info.id,
            info.backend,
            info.status,
            _ago(info.created, now),
            _until(info.expires, now),
            info.image or "-",
        )
        for info in infos
    ]
    headers: tuple[str, ...] = ("ID", "BACKEND", "STATUS", "CREATED", "EXPIRES", "IMAGE")
    if any(info.node is not None for info in infos):  # a cluster's: where each one runs
        headers += ("NODE",)
        rows = [(*row, str(info.node or "-")) for row, info in zip(rows, infos, strict=True)]
    _print_table(headers, rows)
    return 0


def cmd_rm(args: Args) -> int:
    """Remove sandboxes by id, and everything in them."""
    settings = corral.load_settings()
    failed = False
    for sandbox_id in args.ids:
        # One missing sandbox must not stop the others from being removed.
        try:
            corral.attach(sandbox_id, backend=args.backend, settings=settings).close()
        except (corral.NotFoundError, corral.ConflictError) as e:
            _say(f"error: {e}")
            failed = True
            continue
        print(sandbox_id)
    return EXIT_FAILURE if failed else 0


def cmd_gc(args: Args) -> int:
    """Remove the sandboxes whose lifetime is over (every one of corral's with --all)."""
    removed = corral.gc(backend=args.backend, settings=corral.load_settings(), everything=args.all)
    for sandbox_id in removed:
        print(sandbox_id)
    if not removed:
        _progress("nothing to remove")
    return 0


def cmd_stats(args: Args) -> int:
    """Show what a sandbox uses now: CPU time, memory, processes, network and disk I/O."""
    sandbox = corral.attach(args.id, backend=args.backend, settings=corral.load_settings())
    _detach(sandbox)
    usage = sandbox.usage()
    if args.json:
        _print_json({"sandbox_id": sandbox.id, **attrs.asdict(usage)})
        return 0
    rows = [
        (field.name, _usage_text(field.name, getattr(usage, field.name)))
        for field in attrs.fields(corral.ResourceUsage)
        if field.name != "timestamp"
    ]
    _print_table(("FIELD", "VALUE"), rows)
    return 0


def _attached(args: Args) -> corral.Sandbox:
    """A handle on the sandbox ``args.id`` that leaves it as it is."""
    sandbox = corral.attach(args.id, backend=args.backend, settings=corral.load_settings())
    _detach(sandbox)
    return sandbox


def _say_status(sandbox: corral.Sandbox, args: Args) -> int:
    if args.json:
        _print_json({"sandbox_id": sandbox.id, "status": sandbox.status})
    else:
        print(sandbox.id)
    return 0


def cmd_pause(args: Args) -> int:
    """Freeze every process of a sandbox: memory and files kept, no CPU used."""
    sandbox = _attached(args)
    sandbox.pause()
    return _say_status(sandbox, args)


def cmd_resume(args: Args) -> int:
    """Thaw a sandbox that corral pause froze."""
    sandbox = _attached(args)
    sandbox.resume()
    return _say_status(sandbox, args)


def cmd_extend(args: Args) -> int:
    """Move a sandbox's end later by T (30m, 2h), up to 30 days from now."""
    sandbox = _attached(args)
    expires = sandbox.extend(args.duration)
    if args.json:
        _print_json({"sandbox_id": sandbox.id, "expires": expires})
    else:
        print(f"{sandbox.id} expires {_until(expires, time.time())}")
    return 0


def cmd_ps(args: Args) -> int:
    """List the processes started in a sandbox in the background, running or ended."""
    sandbox = _attached(args)
    found = [process.info for process in sandbox.processes()]
    if args.json:
        _print_json([attrs.asdict(info) for info in found])
        return 0
    now = time.time()
    rows = [
        (
            info.id,
            "running" if info.running else f"exited {info.exit_code}",
            _ago(info.started, now),
            "yes" if info.tty else "no",
            " ".join(info.argv),
        )
        for info in found
    ]
    _print_table(("ID", "STATUS", "STARTED", "TTY", "COMMAND"), rows)
    return 0


def cmd_snapshot(args: Args) -> int:
    """Capture a sandbox's files, and print the image that new sandboxes start from.

    corral run --image IMAGE (or corral create) starts one from it; corral gc removes
    it once its lifetime is over.
    """
    sandbox = _attached(args)
    snap = sandbox.snapshot(memory=args.memory, lifetime=args.lifetime)
    if args.json:
        _print_json(attrs.asdict(snap.info))
    else:
        print(snap.image)
    return 0


def cmd_port(args: Args) -> int:
    """Show where a sandbox's published ports are reached on this host's loopback."""
    sandbox = _attached(args)
    wanted = sandbox.spec.ports if args.port is None else (args.port,)
    ports = {port: "{}:{}".format(*sandbox.port(port)) for port in wanted}
    if args.json:
        _print_json({str(port): address for port, address in ports.items()})
        return 0
    for port, address in ports.items():
        print(f"{port} -> {address}")
    return 0


def _usage_text(name: str, value: float | None) -> str:
    if value is None:  # the backend cannot know it, which is not the same as zero
        return "unknown"
    if name.endswith("_bytes"):
        return _size(int(value))
    if name == "cpu_seconds":
        return f"{value:.2f}s"
    return str(value)


# -- plugins, backends and settings ----------------------------------------------------------


def _availability(name: str, settings: corral.Settings | None) -> Availability:
    if settings is None:
        return Availability(False, "the settings cannot be read", "fix them (see corral config)")
    # Never raises: the host's error boundary turns a broken backend, or a missing client
    # library, into an unavailable one with the error's own fix.
    return get_host().availability(name, settings)


def _notes(available: Availability) -> str:
    """What `corral backends` says beside a backend: why not, or its warnings."""
    if not available.ok:
        return str(available)
    return "; ".join(f"warning: {w}" for w in available.warnings)


def _provenance(distribution: str | None, version: str | None) -> str:
    return " ".join(part for part in (distribution, version) if part) or "-"


def cmd_backends(args: Args) -> int:
    """List the installed backends, where they come from, whether they can run here (why
    not, and the fix), and what to know about those that can (an engine release older
    than a security fix)."""
    settings = corral.load_settings()
    found = []
    for name, record in sorted(get_host().backends().items()):
        available = _availability(name, settings)
        found.append((name, record, available))
    if args.json:
        _print_json(
            [
                {
                    "name": name,
                    "description": record.info.description,
                    "plugin": record.plugin,
                    "distribution": record.distribution,
                    "version": record.version,
                    "available": available.ok,
                    "reason": available.reason,
                    "fix": available.fix,
                    "warnings": list(available.warnings),
                    "refused": record.refused,
                }
                for name, record, available in found
            ]
        )
        return 0
    rows = [
        (
            name,
            _provenance(record.distribution, record.version),
            "yes" if available.ok else ("refused" if record.refused else "no"),
            _notes(available),
        )
        for name, record, available in found
    ]
    _print_table(("NAME", "DISTRIBUTION", "AVAILABLE", "NOTES"), rows)
    return 0


def cmd_plugins(args: Args) -> int:
    """List the loaded plugins with their distributions, versions and hooks."""
    records = get_host().plugins()
    if args.json:
        _print_json([attrs.asdict(record) for record in records])
        return 0
    rows = [
        (r.name, _provenance(r.distribution, r.version), ", ".join(r.hooks) or "-") for r in records
    ]
    _print_table(("NAME", "DISTRIBUTION", "HOOKS"), rows)
    return 0


def _doctor_settings() -> corral.Settings | None:
    """Print where the settings come from; the settings, or None when they are broken."""
    try:
        found = [name for name, _ in settings_module.sources()] or ["none (built-in defaults)"]
        settings = corral.load_settings()
    except corral.ConfigError as e:
        found, settings = [f"cannot be read: {line}" for line in str(e).splitlines()], None
    print("config    " + "\n          ".join(found))
    return settings


def _doctor_backends(settings: corral.Settings | None) -> dict[str, Availability]:
    """Print each backend's availability, with why not and how to fix it."""
    print("backends")
    statuses = {name: _availability(name, settings) for name in sorted(get_host().backends())}
    for name, status in statuses.items():
        if status.ok:
            print(f"  {name}: {status}")
            for warning in status.warnings:
                print(f"    warning: {warning}")
            for fact in _diagnosis(name, settings):
                print(f"    {fact}")
            continue
        print(f"  {name}: not available")
        print(f"    why: {status.reason or 'no reason given'}")
        if status.fix:
            print(f"    fix: {status.fix}")
    return statuses


def _diagnosis(name: str, settings: corral.Settings | None) -> list[str]:
    """What an available backend says of itself beyond its check (Podman's init)."""
    try:
        return get_host().backend(name, settings or corral.Settings()).diagnose()
    except corral.SandboxError as e:
        return [f"could not look further: {e}"]


def cmd_doctor(args: Args) -> int:
    """Check this host: Python, corral, configuration files and every backend.

    Exits 0 when the default backend can run here, 1 otherwise.
    """
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"corral    {corral.__version__}")
    print(f"platform  {platform.platform()}")
    settings = _doctor_settings()
    statuses = _doctor_backends(settings)
    # The core's own choice, so doctor judges the backend `corral run` would use.
    default = select_backend_name(None, settings or corral.Settings())
    if default not in statuses:
        print(f"default backend: {default} (not installed)")
        return EXIT_FAILURE
    ok = statuses[default].ok
    print(f"default backend: {default} ({'available' if ok else 'not available'})")
    return 0 if ok else EXIT_FAILURE


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(pairs) + " }"
    # JSON's string escapes are valid in TOML basic strings.
    return json.dumps(str(value))


def _toml_lines(table: dict[str, Any], name: str = "") -> list[str]:
    """A table as TOML: plain values first, then sub-tables; unset values as comments."""
    lines = []
    for key, value in table.items():
        if value is None:
            lines.append(f"# {_toml_key(key)} is not set")
        elif not isinstance(value, dict):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            full = f"{name}.{_toml_key(key)}" if name else _toml_key(key)
            lines += ["", f"[{full}]", *_toml_lines(value, full)]
    return lines


def cmd_config(args: Args) -> int:
    """Show the effective settings and the files and variables they came from."""
    found = [name for name, _ in settings_module.sources()]
    described = settings_module.describe(corral.load_settings())
    if args.json:
        _print_json({"settings": described, "sources": found})
        return 0
    print("# sources, weakest first:")
    for name in found or ["(none: built-in defaults only)"]:
        print(f"#   {name}")
    print("\n".join(_toml_lines(described)))
    return 0


# -- the parser --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line and an exit status per command."""

    def __init__(self, *args: Any, usage_status: int = EXIT_USAGE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_status = usage_status

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(self.usage_status)


def _summary(command: Command) -> str:
    return (command.__doc__ or "").strip().splitlines()[0]


def _add_command(
    commands: Any,
    name: str,
    command: Command,
    parents: list[argparse.ArgumentParser],
    **kwargs: Any,
) -> argparse.ArgumentParser:
    # `run` and `exec` fail with 125 even on a usage error, so a script never mistakes
    # corral's failure for the command's own status.
    status = EXIT_CORRAL_FAILED if name in STATUS_VERBS else EXIT_USAGE
    parser = commands.add_parser(
        name,
        help=_summary(command),
        description=inspect.cleandoc(command.__doc__ or ""),
        parents=parents,
        usage_status=status,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    failure_status = EXIT_CORRAL_FAILED if name in STATUS_VERBS else EXIT_FAILURE
    parser.set_defaults(func=command, failure_status=failure_status, parser=parser)
    return parser


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the result instead of streaming",
    )


def _tty_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tty",
        "-t",
        action="store_true",
        help="give the command a terminal; with -i (-it) ours is connected to it in raw "
        "mode, as docker run -it (needs a terminal)",
    )


def _id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="the sandbox (see corral ls)")


def build_parser() -> argparse.ArgumentParser:
    """The ``corral`` argument parser, with one sub-command per ``cmd_*`` function."""
    parser = _Parser(prog="corral", description=__doc__)
    parser.add_argument("--version", action="version", version=f"corral {corral.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs (also CORRAL_DEBUG=1)"
    )
    # --debug works after the command too; SUPPRESS keeps the global value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument(
        "--backend",
        "-b",
        metavar="NAME",
        help="backend to use (default: CORRAL_BACKEND, the settings, or local)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    commands = parser.add_subparsers(
        dest="verb", metavar="COMMAND", required=True, parser_class=_Parser
    )

    run = _add_command(
        commands, "run", cmd_run, [common, backend], usage="corral run [options] -- CMD..."
    )
    # The sandbox's options, then the command's (options.py); env, workdir and user
    # are the sandbox's here.
    _add_flags(run, option_table.CREATE)
    run.add_argument(
        "--keep",
        action="store_true",
        help="keep the sandbox afterwards and print its id (to stderr)",
    )
    _add_flags(run, option_table.EXEC, skip=option_table.names(option_table.CREATE))
    _tty_option(run)
    _json_option(run)

    exec_ = _add_command(
        commands, "exec", cmd_exec, [common, backend], usage="corral exec ID [options] -- CMD..."
    )
    exec_.add_argument("id", metavar="ID", help="the sandbox (see corral ls)")
    _add_flags(exec_, option_table.EXEC)
    _tty_option(exec_)
    _json_option(exec_)

    shell = _add_command(commands, "shell", cmd_shell, [common, backend])
    _id_argument(shell)
    _add_flags(shell, option_table.EXEC, skip=("stdin",))

    create = _add_command(commands, "create", cmd_create, [common, backend, as_json])
    _add_flags(create, option_table.CREATE)

    _add_command(commands, "ls", cmd_ls, [common, backend, as_json])
    rm = _add_command(commands, "rm", cmd_rm, [common, backend])
    rm.add_argument("ids", nargs="+", metavar="ID", help="the sandboxes to remove")
    gc = _add_command(commands, "gc", cmd_gc, [common, backend])
    gc.add_argument("--all", action="store_true", help="remove every sandbox of corral's")
    stats = _add_command(commands, "stats", cmd_stats, [common, backend, as_json])
    stats.add_argument("id", metavar="ID", help="the sandbox (see corral ls)")
    for name, command in (
        ("pause", cmd_pause),
        ("resume", cmd_resume),
        ("ps", cmd_ps),
    ):
        _id_argument(_add_command(commands, name, command, [common, backend, as_json]))
    extend = _add_command(commands, "extend", cmd_extend, [common, backend, as_json])
    _id_argument(extend)
    extend.add_argument("duration", metavar="T", help="how much later (30m, 2h)")
    snapshot = _add_command(commands, "snapshot", cmd_snapshot, [common, backend, as_json])
    _id_argument(snapshot)
    snapshot.add_argument(
        "--lifetime", metavar="T", help="remove it at gc after T (default: the sandbox's)"
    )
    snapshot.add_argument(
        "--memory", action="store_true", help="capture running processes too, where the backend can"
    )
    port = _add_command(commands, "port", cmd_port, [common, backend, as_json])
    _id_argument(port)
    port.add_argument("port", metavar="PORT", type=int, nargs="?", help="one port (default: all)")
    _add_command(commands, "backends", cmd_backends, [common, as_json])
    _add_command(commands, "plugins", cmd_plugins, [common, as_json])
    _add_command(commands, "doctor", cmd_doctor, [common])
    _add_command(commands, "config", cmd_config, [common, as_json])
    return parser


def parse_args(argv: Sequence[str]) -> Args:
    """The parsed arguments; for `run` and `exec`, ``command`` is what follows ``--``."""
    argv = list(argv)
    parser = build_parser()
    verb = next((arg for arg in argv if not arg.startswith("-")), None)
    if verb not in COMMAND_VERBS:
        return parser.parse_args(argv)
    # Everything after the first "--" is the command, verbatim: argparse's own handling
    # of "--" inside sub-commands differs between Python versions.
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:cut])
    if unknown:
        args.parser.error(
            f"unrecognized arguments: {' '.join(unknown)}; "
            f"put the command after --, as in: {args.parser.usage}"
        )
    args.command = argv[cut + 1 :]
    if not args.command:
        args.parser.error(f"no command given; put it after --, as in: {args.parser.usage}")
    return args


# -- the entry point ----------------------------------------------------------------------------


class _LogFormatter(logging.Formatter):
    """Log records as one line each; the traceback only when debugging."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and not self.debug:
            message = f"{message}: {error}"
        line = f"corral: {record.levelname.lower()}: {message}"
        if error is not None and record.exc_info and self.debug:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(debug))
    logger = logging.getLogger("corral")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False


def _on_terminate(signum: int, frame: Any) -> NoReturn:
    # Raised in the main thread, so every `with sandbox` block on the way out removes
    # what it made, as Ctrl-C does.
    raise SystemExit(128 + signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_terminate)


def _quiet_stdout() -> None:
    # After a closed pipe, Python's own flush at exit would fail again, noisily.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``corral`` command; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    debug = args.debug or os.environ.get("CORRAL_DEBUG", "").strip().lower() in ("1", "true", "yes")
    _configure_logging(debug)
    _install_signal_handlers()
    try:
        return args.func(args)
    except corral.SandboxError as e:
        if debug:
            traceback.print_exc()
        for line in str(e).splitlines() or [type(e).__name__]:
            _say(f"error: {line}")
        return args.failure_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:  # a bug in corral or a plugin: still one line unless debugging
        if debug:
            traceback.print_exc()
        _say(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        return args.failure_status
