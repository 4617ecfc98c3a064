import pytest

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.extras import available, require


def test_require_returns_module():
    assert require("json", "test").dumps([1]) == "[1]"


def test_require_missing_names_the_extra():
    with pytest.raises(VicunaError) as info:
        require("no_such_module_vicuna_xyz", "serve", purpose="vicuna serve")
    assert "vicuna-cli[serve]" in info.value.hint
    assert "vicuna serve" in info.value.message


def test_available():
    assert available("json") and not available("no_such_module_vicuna_xyz")


# Import names whose PyPI distribution is spelled differently.
DISTRIBUTION = {"flash_attn": "flash-attn", "sse_starlette": "sse-starlette", "prometheus_client": "prometheus-client",
                "sky": "skypilot"}


def _require_calls():
    """Every `require(MODULE, EXTRA, ...)` in the package, MODULE read from a literal or from the
    literal tuple a `for` loop over it walks."""
    import ast
    from pathlib import Path

    import vicuna_cli

    for path in sorted(Path(vicuna_cli.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        loops = {node.target.id: node.iter for node in ast.walk(tree)
                 if isinstance(node, ast.For) and isinstance(node.target, ast.Name)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and len(node.args) >= 2):
                continue
            module, extra = node.args[0], node.args[1]
            assert isinstance(extra, ast.Constant), f"{path.name}:{node.lineno}: the extra must be a literal"
            if isinstance(module, ast.Name):
                modules = [elt.value for elt in loops[module.id].elts]
            else:
                modules = [module.value]
            for name in modules:
                yield f"{path.name}:{node.lineno}", name, extra.value


def test_every_required_module_is_in_the_extra_it_names():
    """The hint `pip install 'vicuna-cli[EXTRA]'` must install the module it is given for."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    calls = list(_require_calls())
    assert len(calls) >= 8
    for where, module, extra in calls:
        assert extra in extras, f"{where}: no extra named {extra!r}"
        names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() for spec in extras[extra]}
        assert DISTRIBUTION.get(module, module).lower() in names, f"{where}: {module} is not in the {extra!r} extra"


# --- every third-party import of the package against pyproject (AST scan, offline) ----------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SCANNED = ("vicuna_cli", "kernels")
OWN = {"vicuna_cli", "vicuna_kernels", "__future__"}
# Import names of distributions that may be absent here (GPU-only), spelled as on PyPI.
ABSENT = {"bitsandbytes": "bitsandbytes", "flash_attn": "flash-attn", "vllm": "vllm"}
# A module that imports an optional package at its top, and why that is guarded: the kernels' probe
# (kernels/apply.py) imports it inside a try after find_spec("triton") and falls back with a reason
# naming the `gpu` extra; apply.py's later imports run only once the probe succeeded, and
# vicuna_kernels.rms_norm & co. (the package's lazy attributes) are the API for users who have
# triton. The test checks that the guarded probe exists.
GUARDED_MODULES = {"kernels/triton_ops.py": "triton_ops"}
# Imports reached only through a function that requires the package first, and that function
# (file, name): the test checks that it calls require(package, ...). launch/cost.py prices a
# Recipe, and only recipe.load() makes one.
GATED_BY = {("vicuna_cli/launch/cost.py", "sky"): ("vicuna_cli/launch/recipe.py", "load")}


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


@__import__("functools").cache
def _groups() -> dict[str, set[str]]:
    """Distribution -> the groups ('core' or an extra) that install it: declared there, or required
    (directly) by a distribution declared there."""
    import re
    import tomllib
    from importlib import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {"core": project["dependencies"], **project["optional-dependencies"]}
    groups: dict[str, set[str]] = {}
    for group, specs in declared.items():
        for spec in specs:
            dist = _norm(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])
            groups.setdefault(dist, set()).add(group)
            try:
                requires = metadata.requires(dist) or []
            except metadata.PackageNotFoundError:
                continue
            for req in requires:
                if "extra ==" not in req:
                    groups.setdefault(_norm(re.split(r"[<>=!~;\[ (]", req, maxsplit=1)[0]), set()).add(group)
    return groups


@__import__("functools").cache
def _distribution(module: str) -> str:
    from importlib import metadata

    found = _installed(metadata).get(module)
    return _norm(found[0] if found else ABSENT.get(module, module))


@__import__("functools").cache
def _installed(metadata) -> dict:
    return metadata.packages_distributions()  # slow (reads every installed distribution): once


@__import__("functools").cache
def _import_sites() -> tuple:
    return tuple(_scan())


def _scan():
    """(file, line, top-level module, guard) for every absolute third-party import; guard names
    how the import is protected: 'try' (inside a try that catches ImportError or Exception),
    'require' / 'find_spec' / 'available' (that check on the module comes first in the same
    function, or in the class whose constructor checks it), or None."""
    import ast
    import sys

    stdlib = set(sys.stdlib_module_names)
    for root in SCANNED:
        for path in sorted((ROOT / root).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in stdlib or top in OWN:
                        continue
                    yield path.relative_to(ROOT).as_posix(), node.lineno, top, _guard(node, top, parents)


def _guard(node, top: str, parents) -> str | None:
    import ast

    scope, child = parents.get(node), node
    while scope is not None:
        if isinstance(scope, ast.Try) and child in scope.body:
            caught = {ast.unparse(h.type) for h in scope.handlers if h.type is not None}
            if caught & {"ImportError", "ModuleNotFoundError", "Exception"}:
                return "try"
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            found = _check_call(scope, top, before=node.lineno if not isinstance(scope, ast.ClassDef) else None)
            if found or not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return found
        scope, child = parents.get(scope), scope
    return None


def _check_call(scope, top: str, before: int | None = None) -> str | None:
    """'require' / 'find_spec' / 'available' when `scope` calls it on `top` (before line `before`)."""
    import ast

    for call in ast.walk(scope):
        if (isinstance(call, ast.Call) and (before is None or call.lineno < before) and call.args
                and isinstance(call.args[0], ast.Constant) and call.args[0].value == top):
            name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
            if name in ("require", "find_spec", "available"):
                return name
    return None


def test_every_third_party_import_is_a_dependency_or_in_an_extra():
    groups = _groups()
    sites = list(_import_sites())
    assert len(sites) > 100  # the scan sees the package (torch, typer, rich, ... everywhere)
    undeclared = sorted({f"{where}:{line}: {top} ({_distribution(top)})" for where, line, top, _ in sites
                         if _distribution(top) not in groups})
    assert not undeclared, "imported but in no dependency list of pyproject.toml:\n" + "\n".join(undeclared)


def test_optional_imports_are_guarded():
    """A module only an extra installs is imported after a check that names the extra: require()
    (whose hint is checked above), a try/except ImportError, a find_spec/available() probe, or
    inside the `serve` package, whose commands all call require_serve() first."""
    import ast

    groups = _groups()
    serve_gate = _serve_gate()
    loose = []
    for where, line, top, guard in _import_sites():
        extras = groups[_distribution(top)]
        if "core" in extras or guard is not None:
            continue
        if where.startswith("vicuna_cli/serve/") and "serve" in extras and top in serve_gate:
            continue
        if where in GUARDED_MODULES or (where, top) in GATED_BY:
            continue
        loose.append(f"{where}:{line}: {top} (extra {', '.join(sorted(extras))})")
    assert not loose, "optional import without a guard naming its extra:\n" + "\n".join(loose)
    # The stated guard of each GUARDED_MODULES entry: a probe imports the module inside a try.
    for where, name in GUARDED_MODULES.items():
        importers = []
        for root in SCANNED:
            for path in (ROOT / root).rglob("*.py"):
                tree = ast.parse(path.read_text(encoding="utf-8"))
                parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and (any(a.name == name for a in node.names) or (node.module or "").endswith(name)):
                        importers.append((path.name, _guard(node, "-", parents)))
        assert any(g == "try" for _, g in importers), (where, importers)
    for (where, top), (gate_file, gate) in GATED_BY.items():
        tree = ast.parse((ROOT / gate_file).read_text(encoding="utf-8"))
        function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == gate)
        assert _check_call(function, top) == "require", f"{gate_file}:{gate}() no longer requires {top} ({where} relies on it)"


def _serve_gate() -> set[str]:
    """The modules `require_serve()` checks, plus what their distributions bring (starlette with
    fastapi), read from serve/config.py; and every command that starts a serve role calls it."""
    import ast

    tree = ast.parse((ROOT / "vicuna_cli/serve/config.py").read_text(encoding="utf-8"))
    gate = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "require_serve")
    loop = next(n for n in ast.walk(gate) if isinstance(n, ast.For))
    modules = {elt.value for elt in loop.iter.elts}
    groups = _groups()
    # starlette, anyio, ...: installed by the gated distributions and only by the serve extra
    modules |= {top for _, _, top, _ in _import_sites() if groups.get(_distribution(top)) == {"serve"}}
    return modules


def test_every_package_of_a_runtime_extra_is_used_by_the_package():
    """The other direction: an extra installs nothing the package does not import or require()
    (trl and datasets sat in `train` while only the parity tests and benchmarks import them;
    they are in `test`). The `test` extra is for tests/ and benchmarks/, not scanned here."""
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    used = {_distribution(top) for _, _, top, _ in _import_sites()}
    used |= {_distribution(module) for _, module, _ in _require_calls()}
    unused = sorted(f"{extra}: {spec}" for extra, specs in extras.items() if extra != "test" for spec in specs
                    if _norm(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) not in used)
    assert not unused, "in an extra but imported nowhere in vicuna_cli/ or kernels/:\n" + "\n".join(unused)
