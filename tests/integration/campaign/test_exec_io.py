"""THREATS.md B2 and B3, exec input and output (T13-T22), on every backend.

Input: argv is passed as data (no shell sees it), NUL bytes and empty commands are
refused before anything runs, missing and non-executable programs map to 127 and 126
everywhere, and binary stdin arrives byte for byte. Output: bytes stay exact while text
decodes with U+FFFD, a flood is capped (``truncated``) without the client's memory
growing with it, large output below the cap arrives whole and unmixed, and two full
pipes never deadlock. The catalogue's ``stdout_bytes`` is corral's ``stdout``, its
text is ``text``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid

import psutil
import pytest

import corral

MiB = 1024**2


def _absent(sb: corral.Sandbox, path: str) -> bool:
    return sb.exec(["ls", path]).exit_code != 0


# -- T13: shell metacharacters inside argv elements -------------------------------------


@pytest.mark.through_ray
def test_t13_shell_metacharacters_are_plain_arguments(sandbox):
    sb = sandbox()
    marker = f"/tmp/pwned-{uuid.uuid4().hex}"
    argv = ["echo", f"$(touch {marker})", "`id`", "; rm -rf ~", "a|b>c", "*", "$HOME", "'\"\\"]
    result = sb.exec(argv)
    assert (result.exit_code, result.text) == (0, " ".join(argv[1:]) + "\n")
    assert _absent(sb, marker), "a command substitution ran inside the sandbox"
    assert _absent(sb, "c"), "a redirection ran inside the sandbox"
    assert not os.path.exists(marker), "a command substitution ran on the host"


@pytest.mark.through_ray
def test_t13_twin_an_explicit_shell_does_expand(sandbox):
    result = sandbox().exec(["sh", "-c", "echo $((6 * 7)) | tr 4 X"])
    assert (result.exit_code, result.text) == (0, "X2\n")


# -- T15: NUL bytes in argv, env and paths -------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "field"),
    [
        ({"argv": ["touch", "ran", "a\0b"]}, "argv[2]"),
        ({"argv": ["touch\0", "ran"]}, "argv[0]"),
        ({"argv": ["touch", "ran"], "env": {"A": "x\0y"}}, "env.A"),
        ({"argv": ["touch", "ran"], "workdir": "/tmp\0/x"}, "workdir"),
    ],
    ids=["argv", "argv0", "env", "workdir"],
)
def test_t15_a_nul_byte_is_refused_before_anything_runs(sandbox, keywords, field):
    sb = sandbox()
    keywords = dict(keywords)  # the parameter is shared by every backend's run
    argv = keywords.pop("argv")
    with pytest.raises(corral.ConfigError, match="contains a NUL byte") as caught:
        sb.exec(argv, **keywords)
    assert caught.value.path == field
    assert _absent(sb, "ran"), "the refused command ran anyway"


def test_t15_twin_ordinary_arguments_run(sandbox):
    assert sandbox().exec(["echo", "a", "b"]).text == "a b\n"


# -- T16: degenerate commands ------------------------------------------------------------


def _running_exec_sessions(raw_client_of, backend: str, sandbox_id: str) -> list[str]:
    import docker.errors

    client = raw_client_of(backend)
    running = []
    try:
        for exec_id in client.inspect_container(f"corral-{sandbox_id}").get("ExecIDs") or []:
            with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile: not running
                if client.exec_inspect(exec_id)["Running"]:
                    running.append(exec_id)
    finally:
        client.close()
    return running


@pytest.mark.through_ray
def test_t16_degenerate_commands_map_the_same_on_every_backend(kind, sandbox, raw_client_of):
    sb = sandbox()
    with pytest.raises(corral.ConfigError, match=r"^argv: the command is empty"):
        sb.exec([])
    sb.write_file("/tmp/plain", b"#!/bin/sh\necho should-not-run\n", mode=0o644)
    for argv, code in (
        (["/no/such/cmd"], 127),
        (["no-such-command-anywhere"], 127),
        (["/etc"], 126),  # a directory
        (["/tmp/plain"], 126),  # not executable
    ):
        result = sb.exec(argv, timeout=60)
        assert (result.exit_code, result.timed_out) == (code, False), argv
        assert b"should-not-run" not in result.stdout
    if kind != "local":
        # Docker forgets finished exec sessions; Podman keeps them, finished, until its
        # exit_command_delay: none may still be running.
        assert _running_exec_sessions(raw_client_of, kind, sb.id) == []


@pytest.mark.through_ray
def test_t16_twin_exit_codes_pass_through(sandbox):
    sb = sandbox()
    assert sb.exec(["true"]).exit_code == 0
    assert sb.exec(["sh", "-c", "exit 3"]).exit_code == 3


# -- T17: binary and large stdin ---------------------------------------------------------


@pytest.mark.through_ray
def test_t17_binary_stdin_arrives_byte_for_byte(sandbox):
    sb = sandbox()
    data = os.urandom(1_500_000)
    result = sb.exec(
        ["sh", "-c", "dd of=/tmp/f bs=65536 2>/dev/null && sha512sum /tmp/f"],
        stdin=data,
        timeout=120,
    )
    assert (result.exit_code, result.timed_out) == (0, False), result.stderr_text
    assert result.text.split()[0] == hashlib.sha512(data).hexdigest()
    echoed = sb.exec(["cat"], stdin=data, timeout=120)
    assert echoed.stdout == data


@pytest.mark.through_ray
def test_t17_text_stdin_is_sent_as_utf8_and_stdin_always_ends(sandbox):
    sb = sandbox()
    text = "héllo ✓ 𝄞 \u0000 end\n"
    assert sb.exec(["cat"], stdin=text).stdout == text.encode()
    # An empty stdin, and none at all, both end: cat sees EOF instead of waiting.
    for stdin in (b"", None):
        result = sb.exec(["cat"], stdin=stdin, timeout=60)
        assert (result.exit_code, result.timed_out, result.stdout) == (0, False, b"")


# -- T18: non-UTF-8 output ---------------------------------------------------------------


@pytest.mark.through_ray
def test_t18_bad_bytes_stay_exact_and_text_never_raises(sandbox):
    sb = sandbox()
    result = sb.exec(["sh", "-c", r"printf '\377\376\200ok\n'; printf '\377err\n' >&2"])
    assert result.stdout == b"\xff\xfe\x80ok\n"
    assert result.text == "\ufffd\ufffd\ufffdok\n"
    assert result.stderr == b"\xfferr\n"
    assert result.stderr_text == "\ufffderr\n"


@pytest.mark.through_ray
def test_t18_a_character_split_across_chunks_comes_out_whole(sandbox):
    sb = sandbox()
    # U+1F600 is F0 9F 98 80: two bytes, a pause, the other two.
    script = r"printf '\360\237'; sleep 1; printf '\230\200\n'"
    chunks, result = [], None
    for event in sb.stream(["sh", "-c", script], timeout=60):
        if isinstance(event, corral.OutputChunk):
            chunks.append(event.data)
        else:
            result = event
    assert len(chunks) >= 2, "the character was not split; the case proves nothing"
    assert b"".join(chunks) == result.stdout == "\U0001f600\n".encode()
    assert result.text == "\U0001f600\n"


# -- T19: output floods ----------------------------------------------------------------


def _log_size(raw_client_of, backend: str, sandbox_id: str) -> int:
    """Bytes in the engine's own log of the container (0 where it keeps none)."""
    if backend == "local":
        return 0
    client = raw_client_of(backend)
    try:
        path = client.inspect_container(f"corral-{sandbox_id}").get("LogPath") or ""
    finally:
        client.close()
    return os.path.getsize(path) if path and os.path.exists(path) else 0


@pytest.mark.through_ray
def test_t19_an_endless_flood_is_capped_and_the_client_stays_small(kind, sandbox, raw_client_of):
    sb = sandbox()
    me = psutil.Process()
    rss_before = me.memory_info().rss
    result = sb.exec(["sh", "-c", "yes out & yes err >&2; wait"], timeout=3, max_output=MiB)
    grown = me.memory_info().rss - rss_before
    assert result.timed_out and result.truncated
    assert len(result.stdout) == len(result.stderr) == MiB
    assert set(result.stdout.split(b"\n")[:-1]) == {b"out"}
    assert grown < 64 * MiB, f"the client kept the flood: RSS grew by {grown // MiB} MiB"
    assert _log_size(raw_client_of, kind, sb.id) < MiB
    # The flood is over: nothing of it still runs, and the sandbox still answers.
    assert sb.exec(["sh", "-c", "ps -o comm | grep -c '^yes$'"]).text == "0\n"


@pytest.mark.through_ray
def test_t19_a_finite_flood_is_drained_to_its_end_past_the_cap(sandbox):
    sb = sandbox()
    result = sb.exec(["head", "-c", str(128 * MiB), "/dev/zero"], timeout=120, max_output=MiB)
    # Kept draining past the cap: the command was never blocked on a full pipe.
    assert (result.exit_code, result.timed_out, result.truncated) == (0, False, True)
    assert result.stdout == b"\0" * MiB


@pytest.mark.through_ray
def test_t19_twin_output_at_the_cap_is_not_truncated(sandbox):
    result = sandbox().exec(["head", "-c", str(MiB), "/dev/zero"], max_output=MiB)
    assert (result.exit_code, result.truncated, len(result.stdout)) == (0, False, MiB)


# -- T21, T22: large output, both pipes --------------------------------------------------


@pytest.mark.through_ray
def test_t21_large_output_below_the_cap_arrives_complete_and_unmixed(sandbox):
    sb = sandbox()
    for size in (20_000, 1_000_000, 9_000_000):
        data = base64.b64encode(os.urandom(size * 3 // 4))
        sb.write_file("/tmp/big", data)
        result = sb.exec(
            ["sh", "-c", "cat /tmp/big; tr A-Za-z a-zA-Z < /tmp/big >&2"],
            timeout=120,
            max_output=16 * MiB,
        )
        assert (result.exit_code, result.truncated) == (0, False), size
        assert result.stdout == data, f"stdout of {size} bytes differs"
        assert result.stderr == data.swapcase(), f"stderr of {size} bytes differs"


@pytest.mark.through_ray
@pytest.mark.parametrize(
    "script",
    [
        "yes e | head -c 1048576 >&2; yes o | head -c 1048576",
        "yes e | head -c 1048576 >&2 & yes o | head -c 1048576; wait",
    ],
    ids=["stderr-then-stdout", "both-at-once"],
)
def test_t22_both_pipes_full_never_deadlock(sandbox, script):
    result = sandbox().exec(["sh", "-c", script], timeout=60)
    assert (result.exit_code, result.timed_out) == (0, False)
    assert result.stderr == b"e\n" * (MiB // 2)
    assert result.stdout == b"o\n" * (MiB // 2)
