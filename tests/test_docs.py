"""The docs cannot drift or point away (issue 15): README's reference of the three
TOML files is what scripts/config_reference.py generates from the loaders, every key a
loader accepts is in it, and no link in README.md, docs/ or contrib/ leaves the
repository or points at nothing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import config_reference  # noqa: E402

MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# A path in backticks or plain text that climbs out (`../shared/...`) or is a machine's
# absolute path to a checkout or a workspace.
OUTSIDE = re.compile(r"(?<![\w.])\.\./[\w./-]+|/work/[\w./-]+|/home/\w+/[\w./-]+")


def doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "contrib" / "README.md",
            *sorted((REPO / "docs").rglob("*.md"))]


def test_readme_config_reference_is_generated_from_the_code() -> None:
    readme = (REPO / "README.md").read_text()
    block = config_reference.render()
    assert config_reference.splice(readme, block) == readme, (
        "README.md's configuration reference differs from the code: run "
        "`.venv/bin/python scripts/config_reference.py --write`")


def test_every_key_the_loaders_accept_is_documented() -> None:
    read = config_reference.keys_read_by_code()
    for name, rows in config_reference.tables().items():
        documented = {(section, key) for section, key, _, _ in rows}
        assert read[name] - documented == set(), (name, "undocumented")
        assert documented - read[name] == set(), (name, "documented but not read")


def links_leaving(path: Path, root: Path = REPO) -> list[str]:
    """References in `path` that leave `root` or point at nothing."""
    text = path.read_text()
    rel = path.relative_to(root)
    def inside(ref: str) -> bool:   # a plain path: from the file's directory or the root
        return any((base / ref).resolve().is_relative_to(root) and (base / ref).exists()
                   for base in (path.parent, root))

    bad = [f"{rel}: {m.group(0)}" for m in OUTSIDE.finditer(text)
           if m.group(0).startswith(("/work/", "/home/")) or not inside(m.group(0))]
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        dest = (path.parent / target.split("#")[0]).resolve()
        if target.startswith("/") or not dest.is_relative_to(root) or not dest.exists():
            bad.append(f"{rel}: ]({target})")
    return bad


def test_the_link_check_sees_links_out(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("x")
    probe = tmp_path / "docs" / "x.md"
    probe.write_text("see `../shared/ARCHITECTURE.md`, [a](../../etc/x), [b](/work/y), "
                     "[gone](nothing.md), [ok](../README.md), `../README.md`, "
                     "[web](https://example.org/)")
    assert links_leaving(probe, tmp_path) == [
        "docs/x.md: ../shared/ARCHITECTURE.md", "docs/x.md: ../../etc/x",
        "docs/x.md: /work/y", "docs/x.md: ](../../etc/x)", "docs/x.md: ](/work/y)",
        "docs/x.md: ](nothing.md)"]


def test_no_doc_link_leaves_the_repository() -> None:
    bad = [b for f in doc_files() for b in links_leaving(f)]
    assert bad == [], "\n".join(bad)
