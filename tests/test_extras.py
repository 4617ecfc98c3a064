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
