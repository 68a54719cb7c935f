from textstats import write_report


def test_the_report_lists_the_top_words(tmp_path):
    # tmp_path is under the sandbox's own /tmp: the project itself is mounted read-only.
    report = tmp_path / "report.txt"
    assert write_report("a b a c a b", report, n=2) == 2
    assert report.read_text() == "a 3\nb 2\n"


def test_an_empty_text_gives_an_empty_report(tmp_path):
    report = tmp_path / "report.txt"
    assert write_report("", report) == 0
    assert report.read_text() == ""
