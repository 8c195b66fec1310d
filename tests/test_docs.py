"""The documentation stays true to the code: links resolve, commands and Python snippets name what exists."""

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from nanomarkov.cli import main
from nanomarkov.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md")])
SEARCHED = ("README.md", "ARCHITECTURE.md", "BENCHMARKS.md", "pyproject.toml", "Makefile", "train_mm.sh", ".ci/run")
SEARCHED_DIRS = ("docs", "nanomarkov", "scripts", "tests", "benchmarks", "examples", "configs", "grids")

# Every command the seed's README gives, as a new user would copy it: each must stay documented.
SEED_COMMANDS = (
    "pip install torch numpy matplotlib hmmlearn",
    "pip install wandb",
    "python scripts/mm_generate.py 10 --train 10000 --val 1000",
    "python scripts/mm_generate.py 100 --train 50000 --val 5000 --sparsity 75",
    "./train_mm.sh 10",
    "./train_mm.sh 100 123 --sparse 75",
    "./train_mm.sh 100 --wandb_log=True",
    "python train_mm.py config.py --wandb_log=True",
    "wandb_log = True",
    "python scripts/mm_eval.py --ckpt_path trainings/MM/MM-100/MM-100-42/ckpt.pt",
    "python calculate_theoretical_minimums.py",
    "python configs/mm_config.py",
    "python configs/mm_config_extra.py",
)


def fenced_blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def heading_anchors(text):
    """GitHub's anchors: each heading lower-cased, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def links(doc):
    """(target, anchor) of every relative markdown link in a doc."""
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            yield (doc.parent / path).resolve() if path else doc, anchor


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.relative_to(REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(doc):
    for target, anchor in links(doc):
        assert target.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor:
            anchors = heading_anchors(target.read_text())
            assert anchor in anchors, f"{doc.name} links to {target.name}#{anchor}; its headings: {sorted(anchors)}"


def test_the_readme_is_a_front_page_not_a_manual():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_every_seed_command_is_documented_and_its_file_exists():
    text = "\n".join(doc.read_text() for doc in DOCS)
    for command in SEED_COMMANDS:
        assert command in text, f"the seed's command {command!r} is documented nowhere"
    for path in ("scripts/mm_generate.py", "scripts/mm_eval.py", "train_mm.py", "train_mm.sh", "configs/mm_config.py"):
        assert (REPO / path).is_file(), path


def test_no_file_names_a_moved_guide():
    moved = [name + ".md" for name in ("TRAINING_GUIDE", "EVALUATION_GUIDE", "CLUSTER")]
    files = [REPO / name for name in SEARCHED] + [
        file
        for folder in SEARCHED_DIRS
        for file in (REPO / folder).rglob("*")
        if file.suffix in {".py", ".md", ".sh", ".toml", ".sbatch"}
    ]
    for file in files:
        text = file.read_text()
        for name in moved:
            assert name not in text, f"{file.relative_to(REPO)} names {name}, now under docs/"
    assert (REPO / "scripts" / "train_multinode.sbatch").read_text().count("docs/training.md") == 1


def nanomarkov_commands():
    """(doc, subcommand, argument words) of each `nanomarkov …` line in the docs' bash blocks."""
    for doc in DOCS:
        for block in fenced_blocks(doc.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = line.split("#")[0].split()
                if len(words) >= 2 and words[0] == "nanomarkov":
                    yield doc.name, words[1], words[2:]


def test_every_documented_command_and_flag_exists(capsys):
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    helps = {}
    for doc, command, words in nanomarkov_commands():
        if command not in helps:
            assert main([command, "--help"]) == 0, f"{doc}: nanomarkov {command} is no command"
            helps[command] = capsys.readouterr().out
        for word in words:
            if word.startswith("--") and "=" in word:
                assert word[2:].split("=")[0] in fields, f"{doc}: {word} sets no TrainConfig field"
            elif word.startswith("--"):
                assert re.search(rf"{re.escape(word)}\b", helps[command]), f"{doc}: nanomarkov {command} has no {word}"
    assert {"generate", "theory", "train", "eval", "report", "sweep", "export", "import-hmmlearn"} <= set(helps)


def python_blocks():
    for doc in DOCS:
        for block in fenced_blocks(doc.read_text(), "python"):
            yield doc.name, block


def test_python_snippets_parse_and_name_what_the_package_has():
    """Every nanomarkov import of a snippet resolves, and so does each `name.attribute` of what it imported."""
    checked = 0
    for doc, block in python_blocks():
        tree = ast.parse(block, filename=doc)
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("nanomarkov"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("nanomarkov"):
                        bound[alias.asname or alias.name] = importlib.import_module(alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                assert hasattr(bound[node.value.id], node.attr), f"{doc}: {node.value.id}.{node.attr} does not exist"
                checked += 1
    assert checked >= 15
