"""README.md runs as written.

Every ```python block runs in the environment it states, in a fresh process where every package
of that environment's complement is hidden: the README's set-up is ``make report``'s install
(dynconv with the ``bench`` extra); a block that needs more says so in the line above it
(``Needs `pip install -e ".[export]"` ...`` or ``Needs torchvision (`pip install torchvision`)``),
and only then may it import that extra's packages. A block that silently needs an extra fails
with the ModuleNotFoundError a machine without it would give. The packages hidden are those of
pyproject.toml's other extras (and timm), as they import; they are hidden by wrapping every
import finder, so ``import onnx`` and ``importlib.util.find_spec("onnx")`` behave as if it were
not installed. Blocks sharing an environment run in one process, each in its own namespace.

Cost on a 2-core VM shared with other jobs: about 50 s in all (three processes: the set-up's,
torchvision's and the export extra's, about 13, 8 and 25 s; the rest well under a second each),
most of it importing torch and exporting ONNX.
"""

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_EXTRAS = ("bench",)  # what `make report` installs: the environment the README promises
NOT_DEPENDENCIES = ("timm",)  # integrations the README may mention but no extra installs
IMPORT_NAMES = {"scikit-learn": "sklearn"}  # where a distribution imports under another name


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # README line of the block's first code line
    code: str
    note: str  # the last non-blank line above the opening fence


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[index])
        if not match:
            index += 1
            continue
        above = next((line for line in reversed(lines[:index]) if line.strip()), "")
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(match.group(1), index + 2, "\n".join(lines[index + 1:end]) + "\n",
                            above))
        index = end + 1
    return blocks


def declared(note: str) -> tuple[frozenset[str], frozenset[str]]:
    """(extras, distributions) a block's note says it needs; empty unless the note says
    "needs"."""
    if "needs" not in note.lower():
        return frozenset(), frozenset()
    extras = {e for group in re.findall(r'`pip install -e "\.\[([\w,-]+)\]"`', note)
              for e in group.split(",")}
    dists = set(re.findall(r"`pip install ([A-Za-z][\w.-]*)`", note))
    return frozenset(extras), frozenset(dists)


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def hidden_modules(extras: frozenset[str], dists: frozenset[str]) -> list[str]:
    """Top-level import names of the packages the environment (set-up + ``extras`` +
    ``dists``) lacks: those of the other extras, and NOT_DEPENDENCIES."""
    meta = project()
    optional = meta["optional-dependencies"]
    allowed = {_dist_name(r) for r in meta["dependencies"]}
    allowed |= {_dist_name(r) for extra in (*SETUP_EXTRAS, *extras) for r in optional[extra]}
    allowed |= {d.lower() for d in dists}
    others = {_dist_name(r) for reqs in optional.values() for r in reqs} | set(NOT_DEPENDENCIES)
    missing = others - allowed
    names = set()
    for module, owners in importlib.metadata.packages_distributions().items():
        owners = {_dist_name(o) for o in owners}
        if owners & missing and not owners & allowed:
            names.add(module)
    # not installed here: its usual import name (a machine that has it must not use it either)
    names |= {IMPORT_NAMES.get(d, d.replace("-", "_")) for d in missing}
    return sorted(names)


# Runs in the child: hide the modules, then exec each block in its own namespace. Prints one
# JSON line per block; a failure carries the traceback (README line numbers).
RUNNER = textwrap.dedent('''
    import json, sys, traceback

    payload = json.loads(sys.stdin.read())
    hidden = set(payload["hidden"])


    class Hidden:
        """Wraps one import finder: the hidden packages are not there."""

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                return None
            find = getattr(self.finder, "find_spec", None)
            return find(name, path, target) if find is not None else None

        def __getattr__(self, attribute):
            return getattr(self.finder, attribute)


    for name in list(sys.modules):
        if name.partition(".")[0] in hidden:
            raise SystemExit(f"{name} was imported before the blocker")
    sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
    for block in payload["blocks"]:
        code = "\\n" * (block["line"] - 1) + block["code"]
        try:
            exec(compile(code, payload["file"], "exec"), {"__name__": "__readme__"})
        except BaseException:
            print(json.dumps({"line": block["line"], "error": traceback.format_exc()}))
        else:
            print(json.dumps({"line": block["line"], "error": None}))
        sys.stdout.flush()
''')


def run_blocks(blocks: list[Block], hidden: list[str], tmp_path: Path) -> dict[int, str | None]:
    """README line -> traceback (None when the block ran)."""
    payload = {"hidden": hidden, "file": str(README),
               "blocks": [{"line": b.line, "code": b.code} for b in blocks]}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(payload),
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["line"]] = record["error"]
    assert len(results) == len(blocks), (
        f"the block runner stopped (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return results


def environments() -> dict[tuple[frozenset, frozenset], list[Block]]:
    groups: dict[tuple[frozenset, frozenset], list[Block]] = {}
    for block in readme_blocks(README.read_text()):
        if block.language == "python":
            groups.setdefault(declared(block.note), []).append(block)
    return groups


def _env_id(key) -> str:
    extras, dists = key
    return "+".join(["setup", *sorted(extras), *sorted(dists)])


@pytest.mark.parametrize("env", sorted(environments(), key=_env_id), ids=_env_id)
def test_readme_python_blocks_run_in_their_stated_environment(env, tmp_path):
    blocks = environments()[env]
    results = run_blocks(blocks, hidden_modules(*env), tmp_path)
    failed = {line: error for line, error in results.items() if error}
    assert not failed, "\n".join(
        f"README.md block at line {line} (environment {_env_id(env)}) failed:\n{error}"
        for line, error in failed.items())


# packages of no extra the set-up installs (timm and torchvision are in .[bench])
@pytest.mark.parametrize("module", ["onnx", "onnxruntime", "sklearn", "pytest"])
def test_a_block_needing_an_undeclared_extra_fails(module, tmp_path):
    """The check has teeth: a block that imports another extra's package without a note fails
    as on a machine without it, even where it is installed."""
    (block,) = readme_blocks(f"```python\nimport {module}\n```\n")
    assert declared(block.note) == (frozenset(), frozenset())
    hidden = hidden_modules(frozenset(), frozenset())
    setup = {_dist_name(r) for extra in SETUP_EXTRAS
             for r in project()["optional-dependencies"][extra]}
    assert module not in setup, f"{module} is in the set-up's environment {SETUP_EXTRAS}"
    assert module in hidden
    (error,) = run_blocks([block], hidden, tmp_path).values()
    assert error is not None and f"No module named '{module}'" in error


def test_a_note_declares_the_extra():
    assert declared('Needs `pip install -e ".[export]"` (onnx):') == ({"export"}, set())
    assert declared("Needs torchvision (`pip install torchvision`):") == (set(), {"torchvision"})
    assert "onnx" not in hidden_modules(frozenset({"export"}), frozenset())
    assert "torchvision" not in hidden_modules(frozenset(), frozenset({"torchvision"}))
    assert "matplotlib" not in hidden_modules(frozenset(), frozenset())  # the set-up's own


def test_readme_notes_name_real_extras_and_commands_carry_theirs():
    """Every note names an extra pyproject.toml defines; every shell block that trains (the
    digits demo needs scikit-learn) or exports says it needs that extra."""
    optional = project()["optional-dependencies"]
    needs = {"dynconv.train": "train", "autotune onnx": "export"}
    for block in readme_blocks(README.read_text()):
        extras, _ = declared(block.note)
        assert extras <= set(optional), f"README line {block.line}: unknown extra {extras}"
        for command, extra in needs.items():
            if block.language in ("bash", "sh", "") and command in block.code:
                assert extra in extras, (
                    f"README line {block.line}: runs {command} but its note above "
                    f"({block.note!r}) does not say it needs the {extra} extra")


def test_readme_opens_with_the_title_and_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert lines[2] == "```bash"
    assert [line.split()[:2] for line in lines[3:5]] == [["make", "report"], ["make", "test"]]
    assert lines[5] == "```"


def test_readme_names_no_issue_numbers():
    found = re.findall(r".*\bissues? #?\d+.*", README.read_text(), re.IGNORECASE)
    assert not found, found


def _backends_table(text: str) -> list[str]:
    """The names in the first column of README.md's table headed ``| backend | ... |``."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if re.match(r"\|\s*backend\s*\|", line))
    names = []
    for line in lines[header + 2:]:  # after the |---| separator
        if not line.startswith("|"):
            break
        first_cell = line.split("|")[1]
        names += re.findall(r'`"(\w+)"`', first_cell)
    return names


def test_readme_backends_table_matches_the_registry():
    from dynconv.backends.registry import BACKEND_NAMES

    names = _backends_table(README.read_text())
    assert len(names) == len(set(names)), f"a backend is listed twice: {names}"
    assert set(names) == set(BACKEND_NAMES), (
        f"README backends table {sorted(names)} != registry {sorted(BACKEND_NAMES)}"
    )
