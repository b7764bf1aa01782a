"""The product's import graph does not include the lab. The product is srmig/ except srmig/testbed/; the lab is
srmig/testbed/ (namespaces, guests, demos) and bench/. No product module imports the lab, at top level or inside
a function; `srmig demo` and `srmig bench` reach the CLI through the `srmig.commands` entry points instead
(srmig/cli.py, add_provided_commands), still show in `srmig --help`, and a provider that fails to import leaves
the rest of the CLI working. No root, no network."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRMIG = [sys.executable, "-m", "srmig"]  # this checkout's CLI, whatever `srmig` on PATH points to
LAB = ("bench", "srmig.testbed")


def is_lab(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LAB)


def product_files() -> list[Path]:
    return sorted(p for p in (ROOT / "srmig").rglob("*.py") if p.relative_to(ROOT / "srmig").parts[0] != "testbed")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in source, wherever it is (function bodies, try blocks), relative ones
    resolved against `module`; `from A import b` counts as A and A.b (b may be a submodule); a constant string
    passed to importlib.import_module() or __import__() counts too. Comments and docstrings are not imports."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and (getattr(node.func, "id", None) == "__import__"
                     or getattr(node.func, "attr", None) == "import_module"):
            found.append((node.lineno, node.args[0].value))
    return found


# (what, source, importing module, the lab modules it must be caught importing)
WALKER_CASES = [
    ("import", "import bench", "srmig.cli", {"bench"}),
    ("dotted import as", "import bench.micro as m", "srmig.cli", {"bench.micro"}),
    ("from import", "from bench import micro", "srmig.cli", {"bench", "bench.micro"}),
    ("package as a name", "from srmig import check, testbed", "srmig.cli", {"srmig.testbed"}),
    ("inside a function", "def f():\n    if x:\n        from srmig.testbed.netns import inside\n",
     "srmig.ctl.agent", {"srmig.testbed.netns", "srmig.testbed.netns.inside"}),
    ("relative, sibling", "from . import testbed", "srmig.cli", {"srmig.testbed"}),
    ("relative, parent", "from ..testbed.demo import main", "srmig.ctl.agent",
     {"srmig.testbed.demo", "srmig.testbed.demo.main"}),
    ("relative, in a package", "from .testbed import demo", "srmig", {"srmig.testbed", "srmig.testbed.demo"}),
    ("import_module", "import importlib\nimportlib.import_module('bench.local')", "srmig.cli", {"bench.local"}),
    ("__import__", "__import__('srmig.testbed')", "srmig.cli", {"srmig.testbed"}),
    ("a name that only starts alike", "import benchmark\nfrom srmig import testbeds", "srmig.cli", set()),
    ("the product", "from srmig.ctl import cli_agent\nfrom srmig.bpf.loader import LoaderError", "srmig.cli", set()),
    ("comment and docstring", '"""run python -m srmig.testbed.libvirtd"""\n# from bench import micro\n',
     "srmig.ctl.libvirt_events", set()),
]


@pytest.mark.parametrize("what,source,module,lab", WALKER_CASES, ids=[c[0] for c in WALKER_CASES])
def test_the_walker_finds_every_kind_of_import(what, source, module, lab):
    is_package = module == "srmig"
    assert {m for _, m in imported(textwrap.dedent(source), module, is_package) if is_lab(m)} == lab


def test_the_product_does_not_import_the_lab():
    files = product_files()
    assert ROOT / "srmig/cli.py" in files and not any("testbed" in p.parts for p in files)
    bad = []
    for path in files:
        rel = str(path.relative_to(ROOT))
        for line, module in imported(path.read_text(), module_name(path), path.name == "__init__.py"):
            if not is_lab(module):
                continue
            bad.append(f"{rel}:{line}: imports {module}")
    assert not bad, "the product imports the lab (bench/, srmig/testbed/):\n" + "\n".join(sorted(set(bad)))


def test_importing_the_product_loads_no_lab_module():
    """The same rule at run time, for what the source does not spell out: import every product module in a
    fresh interpreter and look at sys.modules. A module whose optional dependency is missing is skipped."""
    names = [module_name(p) for p in product_files() if p.name != "__main__.py"]
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {names!r}:
            try:
                importlib.import_module(name)
            except ImportError as e:
                if e.name and e.name.startswith({LAB!r}):
                    raise
        print(" ".join(sorted(m for m in sys.modules if m.startswith({LAB!r}))))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [m for m in out.stdout.split() if is_lab(m)] == []


def _commands(help_text: str) -> dict[str, str]:
    """COMMAND -> its help line, from `srmig --help`."""
    commands, name = {}, None
    for ln in help_text.split("positional arguments:")[1].split("options:")[0].splitlines():
        if ln.startswith("    ") and not ln.startswith("     "):  # a command; deeper lines continue its help
            name, *words = ln.split()
            commands[name] = " ".join(words)
        elif name and ln.strip():
            commands[name] = f"{commands[name]} {ln.strip()}".strip()
    return commands


def test_help_lists_demo_and_bench():
    out = subprocess.run([*SRMIG, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = _commands(out.stdout)
    for name in ("demo", "bench", "load", "agent", "ingress"):
        assert name in commands, f"`srmig --help` does not list {name}: {sorted(commands)}"
    assert "unavailable" not in commands["demo"] + commands["bench"]


@pytest.mark.parametrize("argv,flags", [
    (["demo", "--help"], ["--strategy", "--libvirt", "--event-delay-ms", "--db"]),
    (["bench", "--help"], ["--quick", "--only", "--generator", "--sizes", "micro"]),
    (["bench", "micro", "--help"], ["--vms", "--runs", "--json"]),
])
def test_provided_commands_help(argv, flags):
    out = subprocess.run([*SRMIG, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"usage: srmig {' '.join(argv[:-1])}" in out.stdout
    for flag in flags:
        assert flag in out.stdout


@pytest.fixture
def broken_provider(tmp_path):
    """A distribution on PYTHONPATH whose `srmig.commands` entry point names a module that does not exist."""
    dist = tmp_path / "srmig_broken_provider-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: srmig-broken-provider\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[srmig.commands]\nbroken = srmig_no_such_module:register\n")
    return {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}


def test_a_provider_that_fails_to_import_breaks_only_its_command(broken_provider):
    out = subprocess.run([*SRMIG, "--help"], cwd=ROOT, env=broken_provider, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    commands = _commands(out.stdout)
    assert "unavailable" in commands["broken"] and "srmig_no_such_module" in commands["broken"]
    assert "unavailable" not in commands["demo"] + commands["bench"]
    for argv in (["broken"], ["broken", "--help"], ["broken", "micro", "--rate", "5"]):
        out = subprocess.run([*SRMIG, *argv], cwd=ROOT, env=broken_provider, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr == ("srmig: error: `srmig broken` is unavailable: srmig_no_such_module:register failed "
                              "to load (ModuleNotFoundError: No module named 'srmig_no_such_module')\n")
    ok = subprocess.run([*SRMIG, "bench", "micro", "--help"], cwd=ROOT, env=broken_provider, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "--vms" in ok.stdout
