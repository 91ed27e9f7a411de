#!/usr/bin/env python3
"""Rewrite citations of the external method spec into citations of docs/method.md.

docs/method.md keeps the spec's section numbers, so "spec section N" becomes "docs/method.md section N",
"spec sections 2-6" becomes "docs/method.md sections 2-6", "(spec 4-6)" becomes "(docs/method.md sections 4-6)",
"spec section 8.6" becomes "docs/method.md section 8, item 6", and a bare "(section N)" / "of section N" in the
code becomes "(docs/method.md section N)". A few phrasings that name the spec without a number ("the spec's
resize", "as the spec requires") are rewritten one by one.

Idempotent: a rewritten file contains no pattern this script matches. tests/test_docs.py checks the result.

    python tools/cite_method.py            # rewrite in place, print the files changed
    python tools/cite_method.py --check    # change nothing; exit 1 if any file would change
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = "docs/method.md"
# Where citations live; docs/method.md itself, this file and its test (whose patterns and samples name the old
# form) are skipped.
TARGETS = ("mtkd_fast", "csrc", "tests", "benchmarks", "tools", "README.md", "docs")
SKIP = {os.path.join("docs", "method.md"), os.path.join("tools", "cite_method.py"),
        os.path.join("tests", "test_docs.py")}
SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".hpp", ".md", ".sh", ".txt", ".cmake")

_S = "sp" + "ec"  # kept out of the literal text so a search for the old form does not find this file's rules
_NUM = r"\d+(?:\s*-\s*\d+|(?:\s*,\s*\d+)*\s+and\s+\d+)?"  # 7 | 2-6 | 2 and 5 | 1, 2 and 3

# Whole phrases first (order matters: the generic rules below would otherwise take half of them).
PHRASES = [
    (f"written from the {_S}, ../shared/{_S}/MTKD-RL.md, sections", f"written from {DOC} sections"),
    (f"../shared/{_S}/MTKD-RL.md", DOC),
    (f"with the {_S}'s CIFAR-100 parity defaults (section 7)",
     f"with the CIFAR-100 parity defaults of {DOC} section 7"),
    (f"the closed-form gradient of the {_S} (section 3)", f"the closed-form gradient of {DOC} section 3"),
    (f"The {_S}'s resize", f"The resize of {DOC} section 1"),
    (f"the {_S}'s resize", f"the resize of {DOC} section 1"),
    (f"as the {_S} requires", f"as {DOC} section 3 requires"),
    (f"written out from the {_S}", f"written out from {DOC} section 4"),
    (f"against the {_S} written out", f"against {DOC} section 1 written out"),
    (f"the {_S} written out", f"{DOC} section 1 written out"),
    (f"a hand-written step of the {_S}'s formulas", f"a hand-written step of the formulas of {DOC}"),
    (f"against the {_S}'s formulas", f"against the formulas of {DOC}"),
    (f"the {_S}'s T = 4", f"{DOC}'s T = 4"),
    (f"| computes ({_S}) |", f"| computes ({DOC}) |"),
]


def _sections(match: re.Match) -> str:
    nums = match.group("nums")
    plural = bool(re.search(r"-|and|,", nums))
    return f"{DOC} section{'s' if plural else ''} {nums}"


RULES = [  # every file
    # spec section 8.6 -> docs/method.md section 8, item 6
    (re.compile(rf"\b{_S}\s+section\s+(\d+)\.(\d+)", re.I), lambda m: f"{DOC} section {m.group(1)}, item {m.group(2)}"),
    # spec section N / spec sections N-M / Spec sections 2 and 5
    (re.compile(rf"\b{_S}\s+sections?\s+(?P<nums>{_NUM})\b", re.I), _sections),
    # (spec 4-6) / (spec 3)
    (re.compile(rf"\(\s*{_S}\s+(?P<nums>{_NUM})\s*\)", re.I), lambda m: f"({_sections(m)})"),
]
# Code only (a bare "section N" in a Markdown page may mean a section of that page).
CODE_RULES = [
    # bare (section N) / (sections 2 and 5) / "of section 6": name the document
    (re.compile(rf"\((?P<word>sections?)\s+(?P<nums>{_NUM})\b"),
     lambda m: f"({DOC} {m.group('word')} {m.group('nums')}"),
    (re.compile(rf"\bof\s+(?P<word>sections?)\s+(?P<nums>{_NUM})\b"),
     lambda m: f"of {DOC} {m.group('word')} {m.group('nums')}"),
]


def rewrite(text: str, code: bool = True) -> str:
    """``text`` with every citation of the spec turned into a citation of docs/method.md; ``code``: also name
    the document in bare "(section N)" citations (source files, not Markdown pages)."""
    for old, new in PHRASES:
        text = text.replace(old, new)
    for pattern, repl in RULES + (CODE_RULES if code else []):
        text = pattern.sub(repl, text)
    return text


LINE_LENGTH = 120  # as [tool.ruff] in pyproject.toml


def _docstring_lines(text: str) -> set:
    """Numbers (1-based) of the lines that lie inside a triple-quoted string of Python source ``text``."""
    import io
    import tokenize

    lines = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.STRING and tok.string.lstrip("rbuRBU").startswith(('"""', "'''")):
                lines.update(range(tok.start[0], tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    return lines


_CITATION = re.compile(rf"{re.escape(DOC)} sections? {_NUM}(?:, item \d+)?")


def _split_at(line: str, start: int) -> int:
    """The last space in ``line[start:LINE_LENGTH + 1]`` outside a citation (-1 if none): where a long line can
    break without separating "docs/method.md section" from its number."""
    spans = [m.span() for m in _CITATION.finditer(line)]
    cut = line.rfind(" ", start, LINE_LENGTH + 1)
    while cut > start and any(a < cut < b for a, b in spans):
        cut = line.rfind(" ", start, cut)
    return cut


def reflow(old: str, new: str, python: bool) -> str:
    """Break the lines of ``new`` that the rewrite made longer than LINE_LENGTH, where that is safe: comment-only
    lines (``#``, ``//``) continue as comments, lines inside a Python triple-quoted string continue at the same
    indentation. Other lines are left as they are."""
    old_lines = set(old.splitlines())
    inside = _docstring_lines(new) if python else set()
    out = []
    for number, line in enumerate(new.splitlines(keepends=True), 1):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        if len(body) <= LINE_LENGTH or body in old_lines:
            out.append(line)
            continue
        indent = body[: len(body) - len(body.lstrip())]
        marker = next((m for m in ("# ", "// ") if body.lstrip().startswith(m)), None)
        if marker:
            cut = _split_at(body, len(indent) + len(marker))
            prefix = indent + marker
        elif number in inside:
            cut = _split_at(body, len(indent) + 4)
            prefix = indent
        else:
            cut = -1
        if cut <= len(indent):
            out.append(line)
            continue
        out.append(body[:cut] + "\n" + prefix + body[cut + 1:] + ending)
    return "".join(out)


def files(root: str = ROOT):
    for target in TARGETS:
        path = os.path.join(root, target)
        if os.path.isfile(path):
            yield target
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "build"))
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if name.endswith(SUFFIXES) and rel not in SKIP:
                    yield rel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    parser.add_argument("--root", default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    changed = []
    for rel in files(args.root):
        path = os.path.join(args.root, rel)
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = rewrite(old, code=not rel.endswith(".md"))
        if new != old and not rel.endswith(".md"):
            new = reflow(old, new, python=rel.endswith(".py"))
        if new != old:
            changed.append(rel)
            if not args.check:
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(new)
                shutil.copymode(path, tmp)  # keep scripts executable
                os.replace(tmp, path)
    for rel in changed:
        print(("would rewrite " if args.check else "rewrote ") + rel)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
