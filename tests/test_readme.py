"""The README is a front door: short, linking every reference page under docs/, every relative
link (and #anchor) in it and in docs/ resolving, and its one table of results exactly what
bench/readme_results.py builds from the committed bench JSON (no figure typed by hand)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _script():
    spec = importlib.util.spec_from_file_location("readme_results",
                                                  ROOT / "bench" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, spaces,
    hyphens and underscores kept), spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(md: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(md: str) -> list[str]:
    return LINK.findall(FENCE.sub("", md))


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist, or whose #anchor is no heading of
    the Markdown file it names."""
    bad = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing_anchor = (dest.exists() and bool(anchor) and dest.suffix == ".md"
                          and anchor not in anchors(dest.read_text()))
        if not dest.exists() or missing_anchor:
            bad.append(target)
    return bad


def test_readme_under_150_lines():
    assert len(README.read_text().splitlines()) < 150


def test_readme_starts_with_the_two_commands():
    first_block = FENCE.search(README.read_text()).group(0).splitlines()
    assert first_block[0] == "```bash"
    assert first_block[1].startswith("make demo ") and first_block[2].startswith("make test ")


def test_readme_links_every_docs_page():
    pages = sorted(DOCS.glob("**/*.md"))
    assert len(pages) >= 8
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README.read_text())}
    missing = [p.relative_to(ROOT).as_posix() for p in pages if p.resolve() not in linked]
    assert not missing, missing


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("**/*.md"))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert links(page.read_text()), "a page without links cannot be reached back from"
    assert broken_links(page) == []


def test_link_check_catches_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Title: `x`, y\n\n## Other\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#title-x-y) [ok2](a.md#other) [gone](missing.md) "
                    "[bad anchor](a.md#nope) ![img](img.png) [web](https://example.org)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["missing.md", "a.md#nope", "img.png"]


def test_readme_results_table_is_the_generated_one():
    mod = _script()
    assert mod.current_block(README.read_text()) == mod.markdown(ROOT)
    assert mod.main(["--check"]) == 0
    assert (ROOT / mod.PLOT).is_file()


def _copy_bench(tmp: Path) -> None:
    for rel in ("bench/surgeon/results.json", "bench/methods/results.json",
                "bench/shrink/results.json", "bench/surgeon.yaml", "bench/methods.yaml",
                "README.md"):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp / rel)


def test_results_table_follows_the_json_and_overwrites_hand_edits(tmp_path):
    mod = _script()
    _copy_bench(tmp_path)
    runs_file = tmp_path / "bench/surgeon/results.json"
    runs = json.loads(runs_file.read_text())
    hit = [r for r in runs if r["method"] == "surgeon" and r["structure"] == "unstructured"]
    assert len(hit) == 1
    hit[0]["ppl"] = 12.3456
    runs_file.write_text(json.dumps(runs))

    block = mod.markdown(tmp_path)
    assert block != mod.markdown(ROOT)
    surgeon_row = next(x for x in block.splitlines() if x.startswith("| LLM Surgeon"))
    assert surgeon_row.split(" | ")[1] == "**12.35**"

    readme = tmp_path / "README.md"
    edited = readme.read_text().replace("| LLM Surgeon (`surgeon`", "| LLM Surgeon (hand-edited)")
    readme.write_text(edited)
    assert mod.main(["--check", "--root", str(tmp_path)]) == 1
    assert mod.main(["--root", str(tmp_path)]) == 0
    text = readme.read_text()
    assert mod.current_block(text) == block and "hand-edited" not in text
    # everything outside the markers is left as it was
    before, after = README.read_text().split(mod.BEGIN)[0], README.read_text().split(mod.END)[1]
    assert text.startswith(before) and text.endswith(after)
    assert (tmp_path / mod.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # atomic writes leave no temporaries


def test_fmt_ppl():
    mod = _script()
    assert mod.fmt_ppl(33.49203) == "33.49"
    assert mod.fmt_ppl(3409673.57) == "3.4e6"
    assert mod.fmt_ppl(714743.83) == "7.1e5"
