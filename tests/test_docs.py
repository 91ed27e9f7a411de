"""docs/method.md and the citations of it: every "docs/method.md section N" in the sources names a section (and
item) that exists, no citation of the external spec is left, and tools/cite_method.py rewrites the old spellings
correctly and idempotently."""

import ast
import os
import re

import pytest
from repo_tools import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = os.path.join(ROOT, "docs", "method.md")
S = "sp" + "ec"  # the old word, assembled so this file does not cite it itself


cite = load_tool("cite_method")


def _method_sections() -> dict:
    """{section number: set of its numbered item numbers} from the '## N. Title' headings of docs/method.md."""
    sections, current = {}, None
    with open(METHOD, encoding="utf-8") as f:
        for line in f:
            head = re.match(r"## (\d+)\. \S", line)
            if head:
                current = int(head.group(1))
                assert current not in sections, f"docs/method.md: section {current} appears twice"
                sections[current] = set()
            elif line.startswith("## "):
                current = None
            elif current is not None:
                item = re.match(r"(\d+)\. ", line)
                if item:
                    sections[current].add(int(item.group(1)))
    return sections


def _numbers(text: str) -> list:
    """[2, 3, 4, 5, 6] for '2-6', [2, 5] for '2 and 5', [1, 2, 3] for '1, 2 and 3'."""
    out = []
    for part in re.split(r"\s*,\s*|\s+and\s+", text.strip()):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


CITATION = re.compile(r"docs/method\.md(?:'s)? sections? (?P<nums>" + cite._NUM + r")(?:, item (?P<item>\d+))?")
OLD_FORMS = [
    re.compile(r"\b" + S + r"\s+sections?\s+\d", re.I),  # "spec section 3", "Spec sections 2-6"
    re.compile(r"\(\s*" + S + r"\s+\d", re.I),  # "(spec 4-6)"
    re.compile(r"shared/" + S + r"/MTKD-RL\.md"),  # the path outside the repository
    re.compile(r"\bthe " + S + r"\b(?!\w)", re.I),  # "the spec's formulas", "as the spec requires"
]


def _sources():
    for rel in cite.files(ROOT):
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            yield rel, f.read()


def test_method_has_the_numbered_sections():
    sections = _method_sections()
    assert sorted(sections)[:10] == list(range(1, 11)), sorted(sections)
    assert sorted(sections) == list(range(1, len(sections) + 1)), "sections must be numbered 1, 2, 3, ... in order"
    assert sections[8] == set(range(1, 9)), "section 8 lists the code's deviations as items 1-8"


def test_every_citation_names_an_existing_section():
    sections = _method_sections()
    seen, bad = 0, []
    for rel, text in _sources():
        for number, line in enumerate(text.splitlines(), 1):
            for m in CITATION.finditer(line):
                seen += 1
                nums = _numbers(m.group("nums"))
                missing = [n for n in nums if n not in sections]
                item = m.group("item")
                if missing:
                    bad.append(f"{rel}:{number}: {m.group(0)!r} (no section {missing})")
                elif item and int(item) not in sections[nums[0]]:
                    bad.append(f"{rel}:{number}: {m.group(0)!r} (section {nums[0]} has no item {item})")
    assert not bad, "citations of sections that docs/method.md lacks:\n" + "\n".join(bad)
    assert seen >= 20, f"only {seen} citations of docs/method.md found: is the pattern still right?"


def test_no_citation_of_the_external_spec_is_left():
    left = []
    for rel, text in _sources():
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OLD_FORMS):
                left.append(f"{rel}:{number}: {line.strip()}")
        if cite.rewrite(text, code=not rel.endswith(".md")) != text:
            left.append(f"{rel}: tools/cite_method.py would still change it")
    assert not left, "run `python tools/cite_method.py`, then fix what it cannot:\n" + "\n".join(left)


@pytest.mark.parametrize("old, new", [
    (f"(uses {S} section 7)", "(uses docs/method.md section 7)"),
    (f"// {S.title()} section 5: l_i = ...", "// docs/method.md section 5: l_i = ..."),
    (f"maths ({S} sections 2-6).", "maths (docs/method.md sections 2-6)."),
    (f"helpers ({S} sections 2 and 5):", "helpers (docs/method.md sections 2 and 5):"),
    (f"reference ({S} 4-6).", "reference (docs/method.md sections 4-6)."),
    (f"reference ({S} 3).", "reference (docs/method.md section 3)."),
    (f"authors' code ({S} section 8.6): per", "authors' code (docs/method.md section 8, item 6): per"),
    (f"# {S} section 8's teachers", "# docs/method.md section 8's teachers"),
    ("rows summing to 1 (section 4).", "rows summing to 1 (docs/method.md section 4)."),
    ("toward 1 of section 6 or", "toward 1 of docs/method.md section 6 or"),
    ("# Section 2: per-sample quantities", "# Section 2: per-sample quantities"),  # a heading, left alone
    (f"detached here, as the {S} requires", "detached here, as docs/method.md section 3 requires"),
    (f"see ../shared/{S}/MTKD-RL.md", "see docs/method.md"),
])
def test_rewrite_spellings(old, new):
    assert cite.rewrite(old) == new
    assert cite.rewrite(new) == new  # idempotent


def test_bare_section_left_alone_in_markdown():
    text = "the layout (section 3) of this page"
    assert cite.rewrite(text, code=False) == text
    assert cite.rewrite(text, code=True) == "the layout (docs/method.md section 3) of this page"


def test_reflow_breaks_long_lines_safely():
    pad = "x" * 80
    old = (f'def f():\n    """{pad} weights (section 4)."""\n    return 1  # {pad} (section 4)\n'
           f'    # {pad} teachers ({S} section 2)\n')
    new = cite.reflow(old, cite.rewrite(old), python=True)
    lines = new.splitlines()
    for line in lines:
        if "return 1" not in line:  # a code line with a trailing comment is never broken
            assert len(line) <= cite.LINE_LENGTH, line
    assert "    (docs/method.md section 4).\"\"\"" in lines  # the citation stays in one piece
    assert "    # (docs/method.md section 2)" in lines  # a comment continues as a comment
    ast.parse(new)  # still valid Python
    assert cite.reflow(new, cite.rewrite(new), python=True) == new


def test_cite_method_check_mode(tmp_path):
    pkg = tmp_path / "mtkd_fast"
    pkg.mkdir()
    src = pkg / "m.py"
    src.write_text(f'"""Maths ({S} section 3)."""\n')
    os.chmod(src, 0o755)
    assert cite.main(["--root", str(tmp_path), "--check"]) == 1
    assert src.read_text() == f'"""Maths ({S} section 3)."""\n'  # --check changes nothing
    assert cite.main(["--root", str(tmp_path)]) == 0
    assert src.read_text() == '"""Maths (docs/method.md section 3)."""\n'
    assert os.stat(src).st_mode & 0o777 == 0o755  # mode kept
    assert cite.main(["--root", str(tmp_path), "--check"]) == 0
