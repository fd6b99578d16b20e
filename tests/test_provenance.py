"""Tests of the provenance files: LICENSES/MIT.txt, NOTICE, THIRD_PARTY.md, CITATION.cff, CHECKSUMS.txt."""
from __future__ import annotations

import datetime
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The released checkpoints and their SHA-256, as users hold them.
RELEASED = {
    "benv1_pretrain_checkpoint_64.pth": "b4f385f96a1eef96c8b32768b57cee79060fe3d920c7273e2c70e43cc1c90700",
    "benv1_finetune_checkpoint_best.pth": "3778df30224903644d772d151a086d4a1bb006ab61c55ac6534ecb00fe3ae083",
    "benv2_pretrain_checkpoint_64.pth": "13ab3855a2faee9dc1ca0fb50ba483cc4e0d735b9fc8d1f03e75764c356d0b93",
    "benv2_finetune_checkpoint_best.pth": "9592399dcc5f34f608a4b558f897a919d4dd4feb06fc975c108e8f4191689c18",
    "sen12_finetune_checkpoint_best.pth": "33d06401a433191233322a24c551145e53622b6702b4fa9d6d0178cd2392c541",
}
# `sha256sum` text-mode line: 64 lowercase hex digits, two spaces, file name.
CHECKSUM_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$")
needs_sha256sum = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="GNU sha256sum not installed")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dependency_names(specs: list[str]) -> list[str]:
    """``"torch>=2.1"`` -> ``"torch"`` (also strips extras and environment markers)."""
    return [re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0] for spec in specs]


def read_checksums(path: Path) -> dict[str, str]:
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = CHECKSUM_LINE.match(line)
        assert match, f"{path.name}:{number} is not '<sha256>  <name>': {line!r}"
        entries[match.group(2)] = match.group(1)
    return entries


# ----------------------------------------------------------------------------------------------------------
# CHECKSUMS.txt
# ----------------------------------------------------------------------------------------------------------
def test_checksums_lists_the_five_released_files():
    assert read_checksums(REPO / "CHECKSUMS.txt") == RELEASED


@needs_sha256sum
def test_sha256sum_verifies_files_listed_in_this_format(tmp_path):
    contents = {"a_checkpoint_64.pth": b"weights" * 1000, "b_checkpoint_best.pth": b"\x00\x01" * 4096}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    lines = [f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in contents.items()]
    (tmp_path / "CHECKSUMS.txt").write_text("".join(lines))
    assert read_checksums(tmp_path / "CHECKSUMS.txt")  # the layout the real file is checked against
    ok = subprocess.run(["sha256sum", "-c", "CHECKSUMS.txt"], cwd=tmp_path, capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == 2
    (tmp_path / "b_checkpoint_best.pth").write_bytes(b"tampered")
    bad = subprocess.run(["sha256sum", "-c", "CHECKSUMS.txt"], cwd=tmp_path, capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 1 and "b_checkpoint_best.pth: FAILED" in bad.stdout


@needs_sha256sum
def test_sha256sum_reads_the_real_checksums_file(tmp_path):
    shutil.copy(REPO / "CHECKSUMS.txt", tmp_path / "CHECKSUMS.txt")
    command = ["sha256sum", "-c", "CHECKSUMS.txt", "--ignore-missing"]
    # No checkpoint present: GNU coreutils accepts the file but exits 1 with "no file was verified".
    empty = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert empty.returncode == 1 and "no file was verified" in empty.stderr
    assert "improperly formatted" not in empty.stderr
    # A wrong file under a released name is checked (and fails); the other names are skipped as missing.
    (tmp_path / "benv1_pretrain_checkpoint_64.pth").write_bytes(b"not the released weights")
    wrong = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert wrong.returncode == 1
    assert wrong.stdout.strip() == "benv1_pretrain_checkpoint_64.pth: FAILED"


# ----------------------------------------------------------------------------------------------------------
# CITATION.cff
# ----------------------------------------------------------------------------------------------------------
def load_citation() -> dict:
    # CFF files are YAML; keep dates as strings (as the CFF schema expects) rather than date objects.
    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return yaml.load((REPO / "CITATION.cff").read_text(encoding="utf-8"), Loader=Loader)


def check_authors(authors: list) -> None:
    assert isinstance(authors, list) and authors
    for person in authors:
        assert isinstance(person, dict)
        assert ("family-names" in person and "given-names" in person) or "name" in person, person
        if "orcid" in person:
            assert re.fullmatch(r"https://orcid.org/\d{4}-\d{4}-\d{4}-\d{3}[\dX]", person["orcid"])


def test_citation_has_the_required_cff_keys():
    cff = load_citation()
    assert cff["cff-version"] == "1.2.0"
    assert isinstance(cff["message"], str) and isinstance(cff["title"], str) and cff["title"]
    assert cff["type"] == "software" and cff["license"] == "MIT"
    check_authors(cff["authors"])
    assert str(cff["version"]) == pyproject()["project"]["version"]
    datetime.date.fromisoformat(cff["date-released"])


def test_citation_prefers_the_igarss_2025_paper():
    paper = load_citation()["preferred-citation"]
    assert paper["type"] == "conference-paper"
    assert paper["title"] == "SAR-W-MixMAE: SAR Foundation Model Training Using Backscatter Power Weighting"
    assert [(a["given-names"], a["family-names"]) for a in paper["authors"]] == [
        ("Ali", "Caglayan"), ("Nevrez", "Imamoglu"), ("Toru", "Kouyama")]
    check_authors(paper["authors"])
    assert paper["year"] == 2025 and paper["month"] == 8
    assert paper["conference"]["name"].startswith("IGARSS 2025")


def test_citation_references_the_methods_implemented():
    references = load_citation()["references"]
    titles = " | ".join(reference["title"] for reference in references)
    for method in ("MixMAE", "SimMIM", "Masked Autoencoders Are Scalable", "Swin Transformer"):
        assert method in titles
    for reference in references:
        assert reference["type"] in {"conference-paper", "article"} and isinstance(reference["year"], int)
        check_authors(reference["authors"])


# ----------------------------------------------------------------------------------------------------------
# LICENSES/MIT.txt, NOTICE, THIRD_PARTY.md
# ----------------------------------------------------------------------------------------------------------
def test_license_is_mit_with_the_project_copyright():
    text = (REPO / "LICENSES" / "MIT.txt").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2025-2026 The SAR-W-MixMAE contributors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text


def test_notice_states_independence_and_cites_every_method():
    text = " ".join((REPO / "NOTICE").read_text().split())
    assert "independent implementation" in text and "MIT License" in text
    for arxiv in ("2503.01181", "2205.13137", "2111.09886", "2111.06377", "2103.14030", "2111.09883",
                  "2010.11929"):
        assert f"arXiv:{arxiv}" in text, arxiv
    for dataset in ("BigEarthNet", "SEN12-FLOOD", "SSL4EO-S12", "CDLA-Permissive-1.0", "CC-BY-4.0"):
        assert dataset in text


def test_third_party_lists_every_dependency_with_a_licence():
    text = (REPO / "THIRD_PARTY.md").read_text()
    rows = {line.split("|")[1].strip().split(" ")[0]: line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| Package") and not line.startswith("| Extra")}
    project = pyproject()["project"]
    optional = [spec for specs in project.get("optional-dependencies", {}).values() for spec in specs]
    for name in dependency_names(project["dependencies"]):
        assert name in rows, f"runtime dependency {name} missing from THIRD_PARTY.md"
        assert len([cell for cell in rows[name].split("|") if cell.strip()]) >= 3, name
    own = project["name"]  # extras that pull in another extra of this project (dev -> sarwmix[mpi])
    for name in dependency_names(optional):
        if name == own:
            continue
        assert f"| {name} |" in text or f"| {name} (" in text, f"optional dependency {name} missing"
    assert "redistributes no third-party code, no imagery and no model weights" in text


def test_third_party_lists_every_datasets_file_with_its_sha256():
    rows = dict(re.findall(r"^\| `(datasets/[^`]+)` \|.*\| `([0-9a-f]{64})` \|$",
                           (REPO / "THIRD_PARTY.md").read_text(), re.M))
    files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "datasets").iterdir() if p.is_file())
    assert files and sorted(rows) == files
    for name in files:
        assert hashlib.sha256((REPO / name).read_bytes()).hexdigest() == rows[name], f"{name}: SHA-256 differs"


def test_third_party_lists_every_state_dict_manifest_with_its_sha256_and_source():
    """tests/data/compat: each manifest listed with its SHA-256, the released file it describes and its licence."""
    section = (REPO / "THIRD_PARTY.md").read_text().split("## Files in `tests/data/compat/`", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(tests/data/compat/[^`]+)` \|.*\| `[0-9a-f]{64}` \|$",
                                                        section, re.M)}
    files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests" / "data" / "compat").glob("*.json"))
    assert len(files) == 5 and sorted(rows) == files
    for name in files:
        digest = re.findall(r"`([0-9a-f]{64})`", rows[name])[-1]
        assert hashlib.sha256((REPO / name).read_bytes()).hexdigest() == digest, f"{name}: SHA-256 differs"
    described = {name: row for name, row in rows.items() if "pretrain_mixmim_base" in name or "finetune_" in name}
    assert all(re.search(r"`\w+_checkpoint_(64|best)\.pth`", row) for row in described.values()), described
    assert "MIT" in section and "no weights" in section


# The authors' public links of the released files, in CHECKSUMS.txt order.
RELEASED_LINKS = {
    "benv1_pretrain_checkpoint_64.pth": "https://drive.google.com/file/d/1wGrfp-NVqW_RD2HwzSL1WgpLi-Hwfwj8/view",
    "benv1_finetune_checkpoint_best.pth": "https://drive.google.com/file/d/1upoYLnUod6-whUE1xSrrRaIVvvLlTq-A/view",
    "benv2_pretrain_checkpoint_64.pth": "https://drive.google.com/file/d/1zJdnCKmWJOjUFvOS6kOczFkR1x99KIbH/view",
    "benv2_finetune_checkpoint_best.pth": "https://drive.google.com/file/d/19jHfitDjVQ2ogHCHetyRXqLt0XfqIBDx/view",
    "sen12_finetune_checkpoint_best.pth": "https://drive.google.com/file/d/1wIKk7sY7eZldyE8RggrynJj3u4tetETT/view",
}


def test_readme_lists_each_released_file_with_its_link():
    section = (REPO / "README.md").read_text().split("## Released checkpoints", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `") and ".pth`" in line}
    assert list(rows) == list(RELEASED_LINKS)
    assert all(f"({link})" in rows[name] for name, link in RELEASED_LINKS.items())
    assert "docs/FINETUNE.md#released-checkpoints" in section


def test_finetune_doc_lists_each_released_file_with_its_link_and_hash():
    section = (REPO / "docs" / "FINETUNE.md").read_text().split("### Released checkpoints", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `") and ".pth`" in line}
    assert list(rows) == list(RELEASED_LINKS)
    for name, digest in read_checksums(REPO / "CHECKSUMS.txt").items():
        cells = [cell.strip() for cell in rows[name].split("|")[1:-1]]
        assert f"({RELEASED_LINKS[name]})" in cells[2] and cells[4] == f"`{digest}`", name
        assert cells[3], f"{name}: no paper figure (or 'not reported')"
    assert "https://bigearth.net" in section and "10.21227/w6xz-s898" in section
