"""The repository's own text reads as a product: it does not tell how it was developed, and every repository path
it names exists.

Both tests list every offending ``file:line`` at once, so one run shows all there is to fix.
"""

from __future__ import annotations

import glob
import json
import re
import tokenize
from pathlib import Path
from typing import Iterator

from conftest import REPO

THIS = Path(__file__).resolve()
#: Folders and files whose text is read: README, docs, configs, code, tests, notebooks, scripts, build files.
FOLDERS = ("docs", "configs", "lit_meta", "datamodules", "benchmarks", "tests", "notebooks", "scripts")
FILES = ("README.md", "Makefile", "pyproject.toml", ".ci/run")
SUFFIXES = {".md", ".py", ".yaml", ".ipynb", ".sh"}

# Words that belong to the story of the development, not to the product. Built from pieces so that this file does
# not match them (it is also left out of the scan).
PROCESS_WORDS = [
    r"\bsess" r"ions?\b",  # word boundaries keep subprocess's start_new_session=True out
    r"the issue" r"'s",
    r"device le" r"ase",
    r"\ble" r"ase\b",
    r"was le" r"nt",
    r"before this " r"fix",
    r"shared mach" r"ine",
    r"other jobs were shar" r"ing",
    r"alone on the mach" r"ine",
    r"DESIGN\.m" r"d",
    r"\.\./sha" r"red",
]
PROCESS = re.compile("|".join(PROCESS_WORDS), re.IGNORECASE)

TOP_FOLDERS = ("lit_meta", "datamodules", "configs", "tests", "notebooks", "benchmarks", "docs", "scripts")
EXTENSIONS = ("py", "md", "yaml", "yml", "ipynb", "sh", "csv", "tsv", "ckpt", "log", "json", "txt", "zip", "toml")
# A repository-relative path: a known top-level folder, then a file with a known extension (`{a,b}` lists allowed)
# or a folder ending in '/'. The look-behind keeps out the tails of absolute or longer paths.
PATH = re.compile(
    r"(?<![\w./$~-])((?:" + "|".join(TOP_FOLDERS) + r")/(?:[\w.{},*<>-]+/)*"
    r"(?:[\w{},*<>-][\w.{},*<>-]*\.(?:" + "|".join(EXTENSIONS) + r"|\{[\w,]+\})(?![\w-])|(?=[\s`'\")\]:;,]|$)))"
)


def text_files() -> Iterator[Path]:
    """Every text file of :data:`FOLDERS` with a suffix in :data:`SUFFIXES`, and :data:`FILES`."""
    for name in FILES:
        if (REPO / name).is_file():
            yield REPO / name
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            parts = path.relative_to(REPO).parts
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            if path.suffix in SUFFIXES and path.is_file() and path.resolve() != THIS:
                yield path


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_no_text_tells_how_the_repository_was_developed() -> None:
    hits = []
    for path in text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in PROCESS.finditer(line):
                hits.append(f"{where(path, number)}: {match.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, "text about the development, not the product:\n" + "\n".join(hits)


# -------------------------------------------------------------------------------------------- named paths
def prose(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of what a reader reads in ``path``: Markdown whole, YAML comments, Python comments and
    strings (docstrings included), notebook cells' sources."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        yield from enumerate(text.splitlines(), 1)
    elif path.suffix == ".yaml":
        for number, line in enumerate(text.splitlines(), 1):
            if "#" in line:
                yield number, line[line.index("#") :]
    elif path.suffix == ".py":
        with open(path, encoding="utf-8") as file:
            for token in tokenize.generate_tokens(file.readline):
                if token.type in (tokenize.COMMENT, tokenize.STRING):
                    for offset, line in enumerate(token.string.splitlines()):
                        yield token.start[0] + offset, line
    elif path.suffix == ".ipynb":
        for index, cell in enumerate(json.loads(text)["cells"]):
            for line in "".join(cell["source"]).splitlines():
                yield index, line  # the cell's index: a notebook's JSON lines mean little to a reader


def expand(path: str) -> list[str]:
    """The paths ``a/{b,c}.py`` stands for; none for a placeholder such as ``{name}`` or ``<run>``."""
    if "<" in path or ">" in path:
        return []
    brace = re.search(r"\{([^{}]*)\}", path)
    if brace is None:
        return [path]
    if "," not in brace.group(1):
        return []
    return [p for alt in brace.group(1).split(",") for p in expand(path[: brace.start()] + alt + path[brace.end() :])]


def exists(path: str) -> bool:
    if "*" in path:
        return bool(glob.glob(str(REPO / path)))
    return (REPO / path).exists()


def test_every_repository_path_named_in_the_text_exists() -> None:
    missing = []
    for path in text_files():
        if path.suffix == ".sh":
            continue  # a script's paths are code, run by its own tests
        for number, line in prose(path):
            named = {p for match in PATH.finditer(line) for p in expand(match.group(1).rstrip("."))}
            cell = " (cell)" if path.suffix == ".ipynb" else ""
            missing += [f"{where(path, number)}{cell}: {p}" for p in sorted(named) if not exists(p)]
    assert not missing, "paths named in the text that are not in the repository:\n" + "\n".join(missing)


def test_configs_name_no_path_outside_the_repository() -> None:
    # A config's data roots are the user's (data/omniglot, ~/data/...); a path up from the checkout is somebody's
    # machine.
    hits = [
        f"{where(path, number)}: {line.strip()[:100]}"
        for path in sorted((REPO / "configs").glob("*.yaml"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(?<![\w.])\.\./", line)
    ]
    assert not hits, "configs that point outside the checkout:\n" + "\n".join(hits)


def test_the_path_pattern_finds_repository_paths_and_only_those() -> None:
    def found(line: str) -> list[str]:
        return [named for match in PATH.finditer(line) for named in expand(match.group(1).rstrip("."))]

    assert found("see `benchmarks/omniglot.py` and docs/speed.md.") == ["benchmarks/omniglot.py", "docs/speed.md"]
    assert found("configs/omniglot_maml_{5w1s,20w1s}.yaml") == [
        "configs/omniglot_maml_5w1s.yaml",
        "configs/omniglot_maml_20w1s.yaml",
    ]
    assert found("raw output in benchmarks/results/cpu-2026-12-01/ here") == ["benchmarks/results/cpu-2026-12-01/"]
    assert found("/work/x/benchmarks/precision.py, ../docs/a.md, my_tests/a.py") == []
    assert found("configs/<run>.yaml, configs/{name}.yaml, lit_meta.callbacks") == []
