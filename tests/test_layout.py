"""The package layout (docs/design.md, "Layout principles"): imports flow one way, the hub-loadable
model files need only torch and transformers, nothing generic is installed at the top of
site-packages, the README's loading snippet runs as written, and `--help` imports nothing heavy."""

from __future__ import annotations

import ast
import graphlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What `ehr-prs COMMAND --help` must not import (each costs 0.1 to 2 s; together ~6 s).
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "sklearn", "matplotlib", "plotly", "scipy",
         "meds", "pyarrow")


def project_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the two packages.

    The repository keeps tokenizer/, train.py and finetune.py at its top; they install as
    ehr_prs.tokenizer and ehr_prs.recipes.{train,finetune} (ehr_prs/ holds links to them).
    """
    def name_of(parts: tuple[str, ...]) -> str:
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {}
    for root, dirs, files in os.walk(REPO / "ehr_prs"):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not (Path(root) / d).is_symlink()]
        for f in files:
            path = Path(root) / f
            if f.endswith(".py") and not path.is_symlink():
                modules[name_of(path.relative_to(REPO).with_suffix("").parts)] = path
    for path in (REPO / "tokenizer").glob("*.py"):
        modules[name_of(("ehr_prs", "tokenizer", path.stem))] = path
    for path in (REPO / "modeling_ehr_prs").glob("*.py"):
        modules[name_of(("modeling_ehr_prs", path.stem))] = path
    modules["ehr_prs.recipes.train"] = REPO / "train.py"
    modules["ehr_prs.recipes.finetune"] = REPO / "finetune.py"
    return modules


def imported_modules(name: str, path: Path, known: set[str], type_checking: bool = True) -> list[tuple[str, int]]:
    """(module, line) for every import in the file, at the top and inside functions alike.

    Relative imports are resolved; `from pkg import sub` counts as importing pkg.sub when that is
    a module of ours. type_checking=False leaves out `if TYPE_CHECKING:` blocks (they never run).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            found += [(m, node.lineno) for m in subs or [base]]
    return found


MODULES = project_modules()


def test_the_module_list_sees_both_packages():
    # A walk that found nothing would make every check below pass vacuously.
    assert {"ehr_prs.cli", "ehr_prs.tokenizer.build", "ehr_prs.recipes.train", "ehr_prs.recipes.finetune",
            "modeling_ehr_prs", "modeling_ehr_prs.modeling_ehr_prs",
            "modeling_ehr_prs.tokenization_ehr"} <= set(MODULES)
    assert len(MODULES) >= 40


def test_the_import_graph_has_no_cycle():
    """Module -> the modules of ours it imports (at the top or inside a function): a DAG."""
    known = set(MODULES)
    graph = {name: {m for m, _ in imported_modules(name, path, known, type_checking=False) if m in known and m != name}
             for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 50  # the graph is not empty

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    # Every import that lies on a cycle (b reaches back to a), so one run names all of them.
    on_cycle = sorted(f"{a} -> {b}" for a in graph for b in graph[a] if a in reachable(b))
    assert not on_cycle, "imports on a cycle (move what both need into a module below them):\n" + "\n".join(on_cycle)
    list(graphlib.TopologicalSorter(graph).static_order())  # and graphlib agrees: no CycleError


def test_the_model_files_import_only_torch_transformers_and_the_standard_library():
    """modeling_ehr_prs/ travels to a hub as remote code: nothing from ehr_prs (no upward import), nothing else."""
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "modeling_ehr_prs", "__future__"}
    # transformers' own configs declare their checks with this (configuration_utils.py, configuration_llama.py);
    # it ships with transformers, so remote code may use it too.
    allowed_modules = {"huggingface_hub.dataclasses"}
    bad = []
    for name, path in MODULES.items():
        if name.split(".")[0] != "modeling_ehr_prs":
            continue
        for module, line in imported_modules(name, path, set(MODULES)):
            if module.split(".")[0] not in allowed and module not in allowed_modules:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_code_imports_the_generic_top_level_names():
    """tokenizer/, train.py and finetune.py are installed as ehr_prs.tokenizer and ehr_prs.recipes.*: a bare
    `import tokenizer` works only inside a checkout (and would clash with any other `tokenizer`)."""
    files = list(MODULES.values())
    for folder in ("tests", "benchmarks", "scripts"):
        files += sorted((REPO / folder).rglob("*.py"))
    bare = {"tokenizer", "train", "finetune"}
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in files for module, line in imported_modules("__main__", path, set())
           if module.split(".")[0] in bare]
    assert len(files) > 60
    assert not bad, "\n".join(bad)


def test_the_wheel_installs_only_the_two_packages(tmp_path):
    """Build the wheel offline from a copy of the sources and read its file names."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode != 0:
        pytest.skip("building the wheel needs pip in this environment")
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "train.py", "finetune.py"):
        shutil.copy(REPO / name, src / name)
    for name in ("ehr_prs", "tokenizer", "modeling_ehr_prs"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        assert top == {"ehr_prs", "modeling_ehr_prs"}
        # the recipes and the tokenizer stage inside the namespace, as the real files (not links)
        assert z.read("ehr_prs/recipes/train.py") == (REPO / "train.py").read_bytes()
        assert z.read("ehr_prs/recipes/finetune.py") == (REPO / "finetune.py").read_bytes()
        assert z.read("ehr_prs/tokenizer/build.py") == (REPO / "tokenizer" / "build.py").read_bytes()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert re.search(r"^ehr-prs = ehr_prs\.cli:main$", entry_points, re.M)
    # every module of the source tree is installed (a new subpackage missing from pyproject.toml's list is not)
    installed = {n[: -len(".py")].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert set(MODULES) <= installed, sorted(set(MODULES) - installed)


# ----------------------------------------------------------------------------- the README's snippet


def readme_loading_snippet() -> str:
    """The first python code block after the README heading about loading a model."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^#+ [^\n]*\bload", text, re.M | re.I)
    assert heading, "README.md has no heading about loading a model"
    block = re.compile(r"^```python\n(.*?)^```", re.M | re.S).search(text, heading.end())
    assert block, "no ```python block after the README's loading heading"
    return block.group(1)


def model_folders_in(code: str) -> set[str]:
    """The folder strings the snippet passes to `.from_pretrained(...)` (directly or through a variable)."""
    tree = ast.parse(code)
    assigned = {t.id: node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    folders = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                folders.add(arg.value)
            elif isinstance(arg, ast.Name) and isinstance(assigned.get(arg.id), str):
                folders.add(assigned[arg.id])
    return folders


def save_tiny_model_folder(folder: Path) -> None:
    """A folder as `ehr-prs pretrain` writes it (config, weights, tokenizer), from a two-person vocabulary."""
    import datetime as dt

    import polars as pl

    from ehr_prs.tokenizer.vocab import fit_vocabulary
    from modeling_ehr_prs import EhrPrsConfig, EhrPrsForCausalLM, EhrTokenizer

    events = pl.DataFrame(
        {"subject_id": [1, 1, 2, 2], "time": [dt.datetime(1960, 1, 1), dt.datetime(2020, 1, 1)] * 2,
         "code": ["MEDS_BIRTH", "ICD10CM/E11.9", "MEDS_BIRTH", "ICD10CM/I10"], "numeric_value": [None] * 4},
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32})
    state, _ = fit_vocabulary([events], min_subjects=1)
    tokenizer = EhrTokenizer(state=state)
    config = EhrPrsConfig.from_preset("tiny", vocab_size=len(tokenizer), n_prs=0, prs_fusion="none",
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    EhrPrsForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_readme_loading_snippet_runs_as_written(tmp_path):
    code = readme_loading_snippet()
    assert "import modeling_ehr_prs" in code
    folders = model_folders_in(code)
    assert folders, f"the README's snippet loads no folder with .from_pretrained(...):\n{code}"
    model_dir = tmp_path / "model"
    save_tiny_model_folder(model_dir)
    for folder in folders:  # the one substitution: the snippet's folder -> the tiny model's
        code = code.replace(repr(folder), repr(str(model_dir))).replace(f'"{folder}"', repr(str(model_dir)))
    # What the snippet left in its namespace: a loaded model and tokenizer, not just no error.
    code += "\nprint('LOADED', sorted({type(v).__name__ for v in list(globals().values())}))\n"
    work = tmp_path / "elsewhere"  # outside the repository: the installed package, not the checkout
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.strip().splitlines()[-1]
    assert "EhrPrsForCausalLM" in loaded and "EhrTokenizer" in loaded, loaded


# ----------------------------------------------------------------------------- a fast --help


def _help_argv() -> list[list[str]]:
    from ehr_prs.cli import COMMANDS

    return [[]] + [[name] for name in COMMANDS]


HELP_PROBE = """
import contextlib, io, json, sys
{call}
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main({argv!r})
    except SystemExit:
        pass
print(json.dumps({{"help": out.getvalue(), "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & {heavy!r})}}))
"""


def _heavy_imports_of_help(call: str, argv: list[str]) -> tuple[str, list[str]]:
    code = HELP_PROBE.format(call=call, argv=argv, heavy=set(HEAVY))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["help"], result["heavy"]


@pytest.mark.parametrize("argv", _help_argv(), ids=lambda a: " ".join(a) or "ehr-prs")
def test_help_imports_nothing_heavy(argv):
    """`ehr-prs [COMMAND] --help` answers from the flags alone: no torch, transformers, ... (timings:
    benchmarks/cli_startup.py)."""
    help_text, heavy = _heavy_imports_of_help("from ehr_prs.cli import main", [*argv, "--help"])
    assert help_text.startswith("usage:"), help_text[:300]  # it printed the help (not an early error)
    assert "--" in help_text
    assert heavy == [], f"`ehr-prs {' '.join(argv)} --help` imported {heavy}"


@pytest.mark.parametrize("recipe", ["train", "finetune"])
def test_recipe_script_help_imports_nothing_heavy(recipe):
    """`python train.py --help` / `python finetune.py --help` (also how `accelerate launch` starts them)."""
    help_text, heavy = _heavy_imports_of_help(f"from ehr_prs.recipes.{recipe} import main", ["--help"])
    assert "--output_dir OUTPUT_DIR, --output-dir OUTPUT_DIR" in help_text
    assert heavy == []


def test_constants_written_out_for_a_light_import_agree_with_their_source():
    """Names copied so that a module needs no heavy import at load time must still equal the original."""
    import meds

    from ehr_prs.data import readers, simulate
    from ehr_prs.recipes import train
    from modeling_ehr_prs.configuration_ehr_prs import PRESETS

    assert readers.KNOWN_SPLITS == (meds.train_split, meds.tuning_split, meds.held_out_split)
    assert (simulate.BIRTH_CODE, simulate.DEATH_CODE) == (meds.birth_code, meds.death_code)
    assert sorted(train.PRESET_NAMES) == sorted(PRESETS)
