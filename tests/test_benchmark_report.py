"""benchmarks/report.py: a benchmark rewrites only its own section of BENCHMARKS.md."""

from benchmarks import report


def test_a_section_is_replaced_in_place_and_the_rest_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        "# B\n\nprose before\n\n<!-- a:start -->\nold a\n<!-- a:end -->\n\nprose after\n\n<!-- b:start -->\nb\n<!-- b:end -->\n"
    )
    report.write_section(path, "a", "new a\n| x |", "## A")
    assert path.read_text() == (
        "# B\n\nprose before\n\n<!-- a:start -->\nnew a\n| x |\n<!-- a:end -->\n\nprose after\n\n<!-- b:start -->\nb\n<!-- b:end -->\n"
    )


def test_a_new_section_is_appended_with_its_heading(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n<!-- a:start -->\na\n<!-- a:end -->\n\n")
    report.write_section(path, "c", "c text", "## C")
    assert (
        path.read_text()
        == "# B\n\n<!-- a:start -->\na\n<!-- a:end -->\n\n## C\n\n<!-- c:start -->\nc text\n<!-- c:end -->\n"
    )
    report.write_section(path, "c", "c again", "## C")  # now it has markers: replaced, not appended twice
    assert path.read_text().count("## C") == 1 and "c again" in path.read_text() and "c text" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temp file left behind
