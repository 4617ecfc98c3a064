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
