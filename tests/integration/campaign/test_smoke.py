"""The campaign's own harness: a harmless sandbox leaves nothing behind on any backend."""


def test_a_harmless_sandbox_runs_and_leaves_nothing(sandbox):
    sb = sandbox()
    assert sb.exec(["echo", "ok"]).text == "ok\n"
