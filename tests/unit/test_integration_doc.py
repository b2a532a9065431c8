"""docs/integration.md shows the example files as they are.

A code block right after ``<!-- example: PATH -->`` must be the file at PATH; after
``<!-- example: PATH#NAME -->``, the part of it between ``--8<-- [start:NAME]`` and
``--8<-- [end:NAME]`` (dedented). ``python -m tests.unit.test_integration_doc`` rewrites the
doc's blocks from the files.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integration.md"
EXAMPLES = ROOT / "docs" / "examples"
#: A marker, then the fenced block it names (the block's text is group "code").
BLOCK = re.compile(
    r"^<!-- example: (?P<path>[^ #]+)(?:#(?P<region>[\w-]+))? -->\n"
    r"(?P<fence>```[a-z]*\n)(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
REGION_MARK = re.compile(r"^\s*(?:#|//|<!--)\s*--8<-- \[(?P<edge>start|end):(?P<name>[\w-]+)\]")


def regions(path: Path) -> dict[str, str]:
    """Every named part of an example file, dedented, without its marker lines or trailing blank lines."""
    found: dict[str, list[str]] = {}
    open_names: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        mark = REGION_MARK.match(line)
        if mark and mark["edge"] == "start":
            assert mark["name"] not in found, f"{path}: region {mark['name']} twice"
            found[mark["name"]] = []
            open_names.append(mark["name"])
        elif mark:
            assert open_names and open_names[-1] == mark["name"], f"{path}: unbalanced {mark['name']}"
            open_names.pop()
        else:
            for name in open_names:
                found[name].append(line)
    assert not open_names, f"{path}: regions left open: {open_names}"
    return {name: textwrap.dedent("".join(lines)).rstrip("\n") + "\n" for name, lines in found.items()}


def source(path: str, region: str | None) -> str:
    """What the block for this marker must hold."""
    file = ROOT / path
    if region is None:
        return file.read_text(encoding="utf-8")
    parts = regions(file)
    assert region in parts, f"{path} has no region {region!r} (it has {sorted(parts)})"
    return parts[region]


def synced(doc: str) -> str:
    """The doc with every marked block replaced by its source."""
    return BLOCK.sub(
        lambda m: m.group(0)[: m.start("code") - m.start(0)] + source(m["path"], m["region"]) + "```",
        doc,
    )


def test_every_marked_block_is_its_source_verbatim() -> None:
    doc = DOC.read_text(encoding="utf-8")
    markers = re.findall(r"^<!-- example: .*-->$", doc, re.MULTILINE)
    blocks = list(BLOCK.finditer(doc))
    assert len(blocks) == len(markers) >= 7, "every example marker must be followed by a code block"
    for block in blocks:
        expected = source(block["path"], block["region"])
        assert block["code"] == expected, (
            f"docs/integration.md's block for {block['path']}#{block['region']} differs from the file; "
            "run python -m tests.unit.test_integration_doc"
        )
    assert synced(doc) == doc


def test_every_example_file_appears_in_the_doc() -> None:
    doc = DOC.read_text(encoding="utf-8")
    named = {m["path"] for m in BLOCK.finditer(doc)}
    files = {
        str(path.relative_to(ROOT))
        for path in EXAMPLES.rglob("*")
        if path.is_file() and path.suffix in {".py", ".js", ".wxml"}
    }
    assert files == named
    shown = {(m["path"], m["region"]) for m in BLOCK.finditer(doc) if m["region"]}
    for path in files:
        for region in regions(ROOT / path):
            assert (path, region) in shown, f"{path}#{region} is marked but not shown in the doc"


def test_regions_are_found_dedented_and_without_markers(tmp_path: Path) -> None:
    example = tmp_path / "example.py"
    example.write_text(
        "def outer():\n"
        "    # --8<-- [start:inner]\n"
        "    def inner():\n"
        "        return 1\n"
        "\n"
        "    # --8<-- [end:inner]\n"
        "    return inner\n"
    )
    assert regions(example) == {"inner": "def inner():\n    return 1\n"}


if __name__ == "__main__":
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(synced(text), encoding="utf-8")
    sys.stdout.write(f"{DOC.relative_to(ROOT)}: {len(list(BLOCK.finditer(text)))} example blocks synced\n")
