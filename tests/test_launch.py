"""`vicuna launch`: recipes loaded by SkyPilot's own loader, their `vicuna` lines parsed by the real
CLI, dry-run costs checked against the shipped price table, the SDK calls (monkeypatched: no cloud
is contacted), and `--local` runs of small recipes (the slow tier runs the mini pipeline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import free_ports

pytest.importorskip("sky", reason="the `sky` extra (scripts/bootstrap.sh installs it)")

from vicuna_cli.core.errors import VicunaError  # noqa: E402
from vicuna_cli.launch import cloud, cost, dryrun, local  # noqa: E402
from vicuna_cli.launch import recipe as recipes  # noqa: E402

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
KINDS = {"train-vicuna-7b.yaml": "job", "train-vicuna-13b.yaml": "job", "train-multinode.yaml": "job",
         "serve-vicuna.yaml": "service", "serve-worker.yaml": "job", "judge.yaml": "job",
         "chat-smoke.yaml": "cluster", "mini-vicuna.yaml": "cluster", "stable-vicuna-13b.yaml": "job"}


def test_the_recipes_the_issue_asks_for_exist():
    assert set(KINDS) == {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_with_skypilots_loader_and_starts_as_its_kind(path):
    loaded = recipes.load(path)
    assert loaded.kind == KINDS[path.name]
    assert loaded.task.run and loaded.task.name
    header = path.read_text().split("\nname:")[0]
    assert loaded.hours is not None, f"{path.name}: the header states no '# Estimate: N hours'"
    assert "--env" in header, f"{path.name}: the header does not say which --env it needs"


def parse_with_the_real_app(words: list[str]) -> None:
    """Build the click contexts of `vicuna WORDS` down to the leaf command, as the CLI would
    before running it: an unknown flag, a bad value or a missing argument raises."""
    import typer

    from vicuna_cli.cli import app

    command = typer.main.get_command(app)
    name, args, parent = "vicuna", list(words), None
    try:
        while True:
            ctx = command.make_context(name, args, parent=parent)
            rest = ctx._protected_args + ctx.args  # typer's own click keeps a group's leftovers here
            if not hasattr(command, "resolve_command") or not rest:
                return
            name, command, args = command.resolve_command(ctx, rest)
            parent = ctx
    except typer.Exit:  # an eager option such as --version finished the parse
        return


def filled(path: Path, words: list[str]) -> list[str]:
    """Recipe words with the recipe's envs and SkyPilot's variables filled in, so typed options
    (`--max-steps "$STEPS"`) are checked with the values they get."""
    loaded = recipes.load(path)
    values = {k: str(v) for k, v in loaded.task.envs.items() if v not in (None, "")}
    values.update(local.skypilot_env(loaded, ROOT), SKYPILOT_NUM_GPUS_PER_NODE="8")
    return [dryrun._VAR.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), w) for w in words]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_vicuna_line_of_every_recipe_parses_with_the_real_cli(path):
    loaded = recipes.load(path)
    lines = recipes.vicuna_commands(loaded.task.setup) + recipes.vicuna_commands(loaded.task.run)
    assert lines, f"{path.name} runs no vicuna command"
    for words in lines:
        parse_with_the_real_app(filled(path, words))


def test_the_line_parser_fails_on_an_unknown_flag_and_a_bad_value():
    from typer._click.exceptions import BadParameter, NoSuchOption

    with pytest.raises(NoSuchOption):
        parse_with_the_real_app(["train", "sft", "-m", "x", "--no-such-flag"])
    with pytest.raises(BadParameter):
        parse_with_the_real_app(["train", "sft", "--max-steps", "$STEPS"])


def test_shell_lines_split_into_simple_commands_with_redirections_dropped():
    script = ('set -e\n. ~/venv/bin/activate\nvicuna serve -m "$M" --port 1 &\n'
              'for i in $(seq 3); do vicuna chat -p ping >/dev/null 2>&1 && break; sleep 2; done\n'
              'vicuna train sft --data a.json \\\n  --max-steps 3  # a comment\nX=1 vicuna judge show\n')
    assert recipes.vicuna_commands(script) == [
        ["serve", "-m", "$M", "--port", "1"], ["chat", "-p", "ping"],
        ["train", "sft", "--data", "a.json", "--max-steps", "3"], ["judge", "show"]]


def table_price(key: str, spot: bool) -> float:
    entry = json.loads((ROOT / "vicuna_cli/launch/prices.json").read_text())["prices"][key]
    side = entry["spot" if spot else "on_demand"]
    return side["instance"] + side["accelerators"]


@pytest.fixture
def offline_prices(monkeypatch, tmp_path):
    """No SkyPilot catalog on disk: the shipped table answers."""
    monkeypatch.setattr(cost, "catalog_file", lambda: tmp_path / "absent.csv")


@pytest.mark.parametrize("name, nodes", [("train-vicuna-7b.yaml", 1), ("train-vicuna-13b.yaml", 1),
                                         ("train-multinode.yaml", 2), ("judge.yaml", 1)])
def test_dry_run_estimate_is_hours_x_nodes_x_the_table_price(name, nodes, offline_prices):
    loaded = recipes.load(ROOT / "recipes" / name)
    result = cost.estimate(loaded)
    first = result.lines[0]
    assert first.accelerators in ("A100-80GB:8", "A100-80GB:1") and first.nodes == nodes
    for spot in (True, False):
        expected = loaded.hours * nodes * table_price(first.accelerators, spot)
        assert first.total(spot) == pytest.approx(expected, rel=1e-9)
    assert result.use_spot


def test_the_7b_and_13b_estimates_are_of_the_order_of_the_original_figures(offline_prices):
    seven = cost.estimate(recipes.load(ROOT / "recipes/train-vicuna-7b.yaml")).lines[0]
    thirteen = cost.estimate(recipes.load(ROOT / "recipes/train-vicuna-13b.yaml")).lines[0]
    # Original: 7B ~$140 spot / ~$500 on demand, 13B ~$300 / ~$1K: hundreds of dollars, spot cheaper.
    for line in (seven, thirteen):
        assert 100 <= line.total(True) < line.total(False) < 2000
    assert thirteen.total(True) == pytest.approx(2 * seven.total(True))


def test_dry_run_prints_the_task_the_commands_and_the_cost_with_its_source(capsys, offline_prices):
    from typer.testing import CliRunner

    from vicuna_cli.cli import app

    result = CliRunner().invoke(app, ["launch", str(ROOT / "recipes/train-vicuna-7b.yaml"), "--dry-run",
                                      "--env", "CHECKPOINT_BUCKET=my-bucket"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    table = json.loads((ROOT / "vicuna_cli/launch/prices.json").read_text())
    assert "A100-80GB" in out and "my-bucket" in out and "setup:" in out and "run:" in out
    assert "vicuna train sft -m meta-llama/Llama-2-7b-hf" in out and "--resume auto" in out
    spot = 24 * table_price("A100-80GB:8", True)
    on_demand = 24 * table_price("A100-80GB:8", False)
    assert f"= ${spot:,.0f} · on-demand" in out and f"= ${on_demand:,.0f}" in out
    assert table["source"] in out and table["date"] in out


def test_prices_come_from_skypilots_catalog_when_it_is_on_disk(monkeypatch, tmp_path):
    catalog = tmp_path / "vms.csv"
    header = "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice"
    rows = ["a2-ultragpu-8g,96.0,1360.0,,,,r1,r1-a,10.0,4.0", "a2-ultragpu-8g,96.0,1360.0,,,,r2,r2-a,9.0,5.0",
            ",,,A100-80GB,8,{},r1,r1-a,20.0,6.0", ",,,A100-80GB,8,{},r2,r2-a,20.0,6.0",
            ",,,A100-80GB,4,{},r1,r1-a,1.0,1.0"]
    catalog.write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.setattr(cost, "catalog_file", lambda: catalog)
    price = cost.price("A100-80GB", 8)
    assert (price.spot, price.spot_zone) == (10.0, "r1-a")
    assert (price.on_demand, price.on_demand_zone) == (29.0, "r2-a")
    assert str(catalog) in price.source


def test_env_for_an_unknown_variable_warns_and_is_passed(capsys):
    loaded = recipes.load(ROOT / "recipes/mini-vicuna.yaml", {"STEPS": "3", "NO_SUCH_VAR": "1"})
    err = capsys.readouterr().err
    assert "NO_SUCH_VAR" in err and "does not use" in err and "STEPS" not in err.split("NO_SUCH_VAR")[0]
    assert loaded.task.envs["STEPS"] == "3" and loaded.task.envs["NO_SUCH_VAR"] == "1"


def test_env_key_alone_takes_the_shells_value_and_a_missing_one_is_an_error():
    assert recipes.parse_env(["A=1", "HF_TOKEN"], {"HF_TOKEN": "t"}) == {"A": "1", "HF_TOKEN": "t"}
    with pytest.raises(VicunaError, match=r"\$HF_TOKEN is not set"):
        recipes.parse_env(["HF_TOKEN"], {})
    with pytest.raises(VicunaError, match="KEY=VALUE"):
        recipes.parse_env(["1A=2"], {})


def test_a_recipe_skypilot_rejects_shows_its_message_and_the_file_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\n\nresources:\n  acelerators: A100:1\n\nrun: vicuna chat\n")
    with pytest.raises(VicunaError) as info:
        recipes.load(bad)
    assert f"{bad}:4" in info.value.message and "did you mean 'accelerators'" in info.value.message


def test_local_refuses_a_recipe_that_needs_gpus_and_names_the_resource():
    with pytest.raises(VicunaError) as info:
        local.check_runnable(recipes.load(ROOT / "recipes/train-vicuna-7b.yaml"))
    assert "--local" in info.value.message and "A100-80GB:8" in info.value.message


def test_a_missing_sky_extra_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sky", None)  # import sky -> ImportError
    with pytest.raises(VicunaError) as info:
        recipes.load(ROOT / "recipes/mini-vicuna.yaml")
    assert info.value.hint == "pip install 'vicuna-cli[sky]'"


@pytest.fixture
def fake_sdk(monkeypatch):
    """SkyPilot's SDK boundary: every call records its arguments and returns a request id."""
    import sky

    calls: list[tuple[str, tuple, dict]] = []

    def record(name):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return f"req-{name}"
        return call

    for module, attr in ((sky, "check"), (sky, "launch"), (sky, "status"), (sky, "down"), (sky.jobs, "launch"),
                         (sky.jobs, "queue"), (sky.jobs, "cancel"), (sky.serve, "up"), (sky.serve, "down"),
                         (sky.serve, "status")):
        monkeypatch.setattr(module, attr, record(f"{module.__name__}.{attr}"))
    answers = {"req-sky.check": ["GCP"]}
    monkeypatch.setattr(sky, "stream_and_get", lambda request: answers.get(request, f"done:{request}"))
    return calls, answers


@pytest.mark.parametrize("name, call", [("train-vicuna-7b.yaml", "sky.jobs.launch"),
                                        ("serve-vicuna.yaml", "sky.serve.up"),
                                        ("chat-smoke.yaml", "sky.launch")])
def test_launch_starts_each_kind_with_its_sdk_call_and_the_env_applied(name, call, fake_sdk):
    calls, _ = fake_sdk
    loaded = recipes.load(ROOT / "recipes" / name, {"HF_TOKEN": "secret-token"})
    result = cloud.launch(loaded, "my-name", down=True)
    assert [c[0] for c in calls] == ["sky.check", call]
    _, args, kwargs = calls[1]
    assert args[0] is loaded.task and args[0].envs["HF_TOKEN"] == "secret-token"
    assert "my-name" in kwargs.values()
    if call == "sky.launch":
        assert kwargs["down"] is True
    assert result == f"done:req-{call}"


def test_missing_cloud_credentials_are_one_line_with_the_fix(fake_sdk):
    _, answers = fake_sdk
    answers["req-sky.check"] = []
    with pytest.raises(VicunaError) as info:
        cloud.launch(recipes.load(ROOT / "recipes/train-vicuna-7b.yaml"), "x")
    assert "no cloud is enabled" in info.value.message and "sky check" in info.value.hint


def test_status_and_down_wrap_the_matching_sdk_calls(fake_sdk):
    calls, _ = fake_sdk
    cloud.status("job"), cloud.down("job", "j1"), cloud.down("service", "s1"), cloud.down("cluster", "c1")
    assert [c[0].rsplit(".", 1)[-1] for c in calls] == ["queue", "cancel", "down", "down"]
    assert calls[1][2] == {"name": "j1"} and calls[2][1] == ("s1",) and calls[3][1] == ("c1",)


def test_cli_status_prints_the_sdk_result_and_logs_without_a_name_is_an_error(fake_sdk):
    from typer.testing import CliRunner

    from vicuna_cli.cli import app

    calls, _ = fake_sdk
    result = CliRunner().invoke(app, ["launch", "status", "--kind", "service"])
    assert result.exit_code == 0 and "done:req-sky.serve.status" in result.stdout
    assert [c[0] for c in calls] == ["sky.serve.status"]
    result = CliRunner().invoke(app, ["launch", "logs"])
    assert isinstance(result.exception, VicunaError) and "needs a name" in result.exception.message


def write_tiny_recipe(tmp_path: Path, run: str, setup: str = "echo setup-ran > setup.txt") -> Path:
    workdir = tmp_path / "src"
    workdir.mkdir()
    (workdir / "data.txt").write_text("hello\n")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({"name": "tiny", "resources": {"cpus": "1+"}, "envs": {"GREETING": "hi", "OUT": ""},
                                  "workdir": str(workdir), "setup": setup, "run": run}))
    return recipe


def test_local_runs_setup_and_run_in_a_copy_of_the_workdir_with_skypilots_variables(tmp_path):
    out = tmp_path / "out.json"
    run = ("python -c \"import json, os, pathlib; json.dump({k: os.environ.get(k) for k in "
           "['GREETING', 'SKYPILOT_NODE_RANK', 'SKYPILOT_NUM_NODES', 'SKYPILOT_NODE_IPS', 'SKYPILOT_TASK_ID']} | "
           "{'cwd': os.getcwd(), 'data': pathlib.Path('data.txt').read_text(), 'setup': pathlib.Path('setup.txt').read_text()}, "
           "open(os.environ['OUT'], 'w'))\"")
    loaded = recipes.load(write_tiny_recipe(tmp_path, run), {"OUT": str(out), "GREETING": "hello"})
    result = local.run_local(loaded)
    seen = json.loads(out.read_text())
    assert seen["GREETING"] == "hello" and seen["data"] == "hello\n" and seen["setup"] == "setup-ran\n"
    assert (seen["SKYPILOT_NODE_RANK"], seen["SKYPILOT_NUM_NODES"], seen["SKYPILOT_NODE_IPS"]) == ("0", "1", "127.0.0.1")
    assert seen["SKYPILOT_TASK_ID"] == local.skypilot_env(loaded, result.work_dir)["SKYPILOT_TASK_ID"]
    assert Path(seen["cwd"]) == result.work_dir and not result.work_dir.exists()  # removed on success


def test_local_failure_keeps_the_work_dir_and_says_where(tmp_path):
    loaded = recipes.load(write_tiny_recipe(tmp_path, "exit 3"))
    with pytest.raises(VicunaError) as info:
        local.run_local(loaded)
    assert "exit code 3" in info.value.message and "kept" in info.value.hint
    assert Path(info.value.hint.rsplit(" ", 1)[-1]).is_dir()


def test_ctrl_c_during_local_stops_every_process_of_the_recipe(tmp_path):
    psutil = pytest.importorskip("psutil")
    pids = tmp_path / "pids"
    # A background child (non-interactive bash makes it ignore SIGINT) and a foreground one.
    run = f"sleep 300 & echo $! >> {pids}; sleep 301 & echo $! >> {pids}; wait"
    recipe = write_tiny_recipe(tmp_path, run, setup="true")
    launcher = subprocess.Popen([sys.executable, "-m", "vicuna_cli", "launch", str(recipe), "--local",
                                 "--stop-timeout", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pids.exists() and len(pids.read_text().split()) == 2):
        time.sleep(0.2)
    children = [int(p) for p in pids.read_text().split()]
    assert all(psutil.pid_exists(p) for p in children)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and "interrupted" in err
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(psutil, p) for p in children):
        time.sleep(0.2)
    assert not any(_alive(psutil, p) for p in children)


def _alive(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- slow tier: the mini recipe for real, on the embedded model ------------------------------

def mini_env(state: Path, **extra: str) -> list[str]:
    api, controller, worker = free_ports(3)
    values = {"STATE_DIR": str(state), "STEPS": "4", "QUESTIONS": "1", "MAX_NEW_TOKENS": "16", "MAX_LENGTH": "256",
              "API_PORT": str(api), "CONTROLLER_PORT": str(controller), "WORKER_PORT": str(worker), **extra}
    return [arg for k, v in values.items() for arg in ("--env", f"{k}={v}")]


def launch_mini(env_args: list[str], home: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "VICUNA_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vicuna_cli", "launch", str(ROOT / "recipes/mini-vicuna.yaml"),
                             "--local", *env_args], cwd=ROOT, env=env, text=True, **popen)


def final_loss(run_dir: Path) -> tuple[int, float]:
    last = json.loads((run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1])
    return last["step"], last["loss"]


@pytest.mark.slow
def test_preemption_drill_sigkill_then_relaunch_ends_with_the_uninterrupted_loss(embedded_model_home, tmp_path):
    psutil = pytest.importorskip("psutil")
    steps = {"STEPS": "8", "UNTIL": "train"}
    whole = launch_mini(mini_env(tmp_path / "whole", **steps), embedded_model_home,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert whole.wait(timeout=900) == 0, whole.stdout.read()

    state = tmp_path / "preempted"
    env_args = mini_env(state, **steps)
    log = (tmp_path / "first.log").open("w")
    first = launch_mini(env_args, embedded_model_home, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = state / "run" / "checkpoints"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and first.poll() is None and not list(checkpoints.glob("step-*/COMPLETE.json")):
        time.sleep(0.2)
    assert first.poll() is None, f"the first launch ended before its first checkpoint: {(tmp_path / 'first.log').read_text()}"
    # The node dies: every process of the launch at once, nothing gets to save.
    family = [first.pid] + [c.pid for c in psutil.Process(first.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.wait(timeout=60)
    assert final_loss(state / "run")[0] < 8

    again = launch_mini(env_args, embedded_model_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert "resum" in out.lower()
    step, loss = final_loss(state / "run")
    assert step == 8 and loss == pytest.approx(final_loss(tmp_path / "whole" / "run")[1], rel=1e-5)


@pytest.mark.slow
def test_mini_vicuna_local_runs_every_stage_end_to_end(embedded_model_home, tmp_path):
    state = tmp_path / "state"
    proc = launch_mini(mini_env(state), embedded_model_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for stage in ("== 1 data", "== 2 train", "== 3 chat", "== 4 serve", "== 5 answer", "== 6 results"):
        assert stage in out, out
    clean = json.loads((state / "clean.json").read_text())
    assert len(clean) >= 60
    assert (state / "run" / "config.json").is_file() and final_loss(state / "run")[0] == 4
    answers = state / "judge" / "model_answer"
    for model in ("mini-vicuna", "base"):
        lines = (answers / f"{model}.jsonl").read_text().strip().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["choices"][0]["turns"][0]
    judgments = list((state / "judge" / "model_judgment").glob("*_pair.jsonl"))
    assert judgments and len(judgments[0].read_text().strip().splitlines()) == 1
    assert "mini-vicuna" in out.split("== 6 results")[1]
