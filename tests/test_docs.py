"""The docs against the code: the configuration reference is what scripts/config_reference.py generates from
the config tree, `dpo-train --help` lists the same keys, types, defaults and help texts, every config key has a
help text, and README.md's relative links reach files and headings that exist (mkdocs checks the pages under
docs/, but it does not read README.md). The site itself is built with `mkdocs build --strict` by scripts/test.sh."""

import csv
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from dpo_train import typed
from dpo_train.config import Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import config_reference  # noqa: E402


def test_the_configuration_page_is_what_the_code_generates():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_reference.render(), "docs/configuration.md is stale: run python scripts/config_reference.py"


def test_every_config_key_and_section_has_a_help_text():
    groups = typed.groups(Config)
    assert [key for group in groups for key, _, _, help in group.rows if not help] == []
    assert [group.prefix for group in groups if group.prefix and not group.doc] == []
    keys = [key for group in groups for key, *_ in group.rows]
    assert len(keys) == len(set(keys)) and "model.lora.r" in keys and "data.train[i].take" in keys


def unescape(cell: str) -> str:
    return cell.strip().replace("\\|", "|").strip("`")


def page_keys() -> dict:
    """{key: (type, default, help)} read back from the tables of docs/configuration.md."""
    found = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            key, kind, default, help = map(unescape, re.split(r"(?<!\\)\|", line)[1:-1])
            found[key] = (kind, "required" if default == "*required*" else default, help)
    return found


def help_keys() -> dict:
    """{key: (type, default, help)} read back from `python -m dpo_train --help`."""
    out = subprocess.run([sys.executable, "-m", "dpo_train", "--help"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    found, key = {}, None
    for line in out.splitlines():
        entry = re.fullmatch(r"  (\S+)  \((.*), (?:default (.*)|(required))\)", line)
        if entry:
            key = entry[1]
            found[key] = [entry[2], entry[3] or entry[4], ""]
        elif key and line.startswith("      "):
            found[key][2] = (found[key][2] + " " + line.strip()).strip()
        else:
            key = None
    return {key: tuple(value) for key, value in found.items()}


def test_help_and_the_configuration_page_say_the_same():
    page, help = page_keys(), help_keys()
    assert len(page) > 60 and "train.output_dir" in page
    assert page == help


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading; GitHub gives the same for plain headings."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1", "", page.read_text(), flags=re.M | re.S)  # no headings inside fences
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+?)\s*$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^    .*$", "", page.read_text(), flags=re.M)  # indented code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_readme_links_reach_files_and_headings_that_exist():
    readme = ROOT / "README.md"
    links = relative_links(readme)
    assert any(link.startswith("docs/") for link in links)
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (readme.parent / path) if path else readme
        if not target.exists() or (anchor and anchor not in anchors(target)):
            broken.append(link)
    assert broken == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Parity with TRL\n\nSee [x](other.md) and [y](#parity-with-trl).\n")
    assert relative_links(page) == ["other.md", "#parity-with-trl"]
    assert anchors(page) == {"title", "parity-with-trl"}
    assert slug("The `packed` layout: one row (FlexAttention)") == "the-packed-layout-one-row-flexattention"


def test_readme_is_short_and_gives_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "\n    bash scripts/test.sh\n" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in (ROOT / "scripts" / "test.sh").read_text()


@pytest.mark.parametrize("data, page", [("engine-memory.csv", "distributed.md"), ("bench-vs-trl.csv", "performance.md")])
def test_chart_data_is_the_table_on_its_page(data, page):
    """scripts/docs_charts.py draws each chart from docs/charts/*.csv: every row there is a row of the page's
    table (the same values on one line, thousands written as the page writes them, 4 503)."""
    rows = list(csv.DictReader((ROOT / "docs" / "charts" / data).open()))
    lines = [line for line in (ROOT / "docs" / page).read_text().splitlines() if line.startswith("|")]
    assert rows
    for row in rows:
        cells = [f"{int(v):,}".replace(",", " ") if v.isdigit() else v for v in row.values()]
        assert any(all(cell in line for cell in cells) for line in lines), row
