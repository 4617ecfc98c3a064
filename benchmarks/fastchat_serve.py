#!/usr/bin/env python
"""Run FastChat's serving stack (the peer) on loopback ports: controller + model_worker +
openai_api_server, from the venv built by ../shared/peers/fastchat/setup.sh.

    python benchmarks/fastchat_serve.py --venv /tmp/fastchat-venv --model-dir DIR [--port 31000]

Runs until Ctrl-C. `bench_serve.py` imports `FastChatStack` to start and stop the same stack
inside one benchmark run. `--model-dir` is a model directory saved by transformers 5 (e.g.
$VICUNA_HOME/models/smollm2-135m-instruct); it is converted once with make_legacy_model.py
(beside setup.sh) into the form transformers 4.44 loads, next to the venv.

FastChat runs with its defaults except (a) the conversation template, which is named explicitly
(`--conv-template`, default vicuna_v1.1): without it, a model name FastChat does not know gets its
`one_shot` template, a 470-token prompt; and (b) the API server's timeout for its worker
(FASTCHAT_WORKER_API_TIMEOUT, 100 s by default), raised to `worker_timeout` (900 s): FastChat's
worker answers at most 5 requests at once (`--limit-worker-concurrency`), and a request queued
behind the others gets no byte for minutes on a 2-core CPU, which the default turns into an error.
`env` adds variables for all three processes (e.g. OMP_NUM_THREADS). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import free_port, stop_group  # noqa: E402  (the tests' one free_port and group stop; stdlib only)

PEER_DIR = Path(os.environ.get("VICUNA_PEERS", Path(__file__).resolve().parents[2] / "shared" / "peers")) / "fastchat"




def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback only)
        return json.loads(response.read())


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after `grace` seconds."""
    stop_group(proc, grace)


def wait_for_model(base_url: str, model: str, procs: list[subprocess.Popen], timeout: float, logs: Path) -> None:
    """Poll `GET /v1/models` until `model` is listed (bounded), failing early if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[2] if len(proc.args) > 2 else proc.args} exited with {proc.returncode}; see {logs}")
        try:
            ids = [m["id"] for m in get_json(f"{base_url}/v1/models").get("data", [])]
            if model in ids:
                return
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base_url} did not list {model} within {timeout:.0f} s; see {logs}")


def legacy_model(venv: Path, model_dir: Path) -> Path:
    """The transformers-4.44 copy of `model_dir` (made once, cached beside the venv)."""
    target = venv.parent / f"{venv.name}-models" / model_dir.name
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(venv / "bin" / "python"), str(PEER_DIR / "make_legacy_model.py"), str(model_dir), str(target)],
            check=True,
        )
    return target


class FastChatStack:
    """controller + model_worker + openai_api_server as process groups; a context manager."""

    def __init__(self, venv: Path, model_dir: Path, model_name: str, conv_template: str = "vicuna_v1.1",
                 port: int | None = None, log_dir: Path | None = None, start_timeout: float = 300.0,
                 env: dict[str, str] | None = None, worker_timeout: float = 900.0):
        self.venv, self.model_dir, self.model_name = Path(venv), Path(model_dir), model_name
        self.conv_template = conv_template
        self.port = port or free_port()
        self.log_dir = Path(log_dir or Path("/tmp") / f"fastchat-serve-{os.getpid()}")
        self.start_timeout = start_timeout
        # LOGDIR: FastChat's own log files (controller.log, model_worker_*.log, ...) go to the current
        # directory unless told otherwise; keep them beside ours, out of the checkout.
        self.env = {**os.environ, "FASTCHAT_WORKER_API_TIMEOUT": f"{worker_timeout:.0f}", "LOGDIR": str(self.log_dir),
                    **(env or {})}
        self.procs: list[subprocess.Popen] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, *args: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        cmd = [str(self.venv / "bin" / "python"), "-m", f"fastchat.serve.{name}", *args]
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env, cwd=self.log_dir, start_new_session=True))
        log.close()

    def start(self) -> "FastChatStack":
        if not (self.venv / "bin" / "python").is_file():
            raise FileNotFoundError(f"no FastChat venv at {self.venv}: run {PEER_DIR / 'setup.sh'} {self.venv}")
        model = legacy_model(self.venv, self.model_dir)
        controller_port, worker_port = free_port(), free_port()
        controller = f"http://127.0.0.1:{controller_port}"
        try:
            self._spawn("controller", "--host", "127.0.0.1", "--port", str(controller_port))
            self._spawn(
                "model_worker", "--host", "127.0.0.1", "--port", str(worker_port),
                "--worker-address", f"http://127.0.0.1:{worker_port}", "--controller-address", controller,
                "--model-path", str(model), "--model-names", self.model_name,
                "--conv-template", self.conv_template, "--device", "cpu",
            )
            self._spawn("openai_api_server", "--host", "127.0.0.1", "--port", str(self.port),
                        "--controller-address", controller)
            wait_for_model(self.base_url, self.model_name, self.procs, self.start_timeout, self.log_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()

    def __enter__(self) -> "FastChatStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(".peers/fastchat-venv"), help="FastChat venv (setup.sh)")
    parser.add_argument("--model-dir", type=Path, required=True, help="model dir saved by transformers 5")
    parser.add_argument("--model-name", default="smollm2-135m-instruct")
    parser.add_argument("--conv-template", default="vicuna_v1.1")
    parser.add_argument("--port", type=int, default=31000, help="port of FastChat's OpenAI API server")
    args = parser.parse_args()
    with FastChatStack(args.venv, args.model_dir, args.model_name, args.conv_template, args.port) as stack:
        print(f"FastChat serves {args.model_name} at {stack.base_url}/v1 (logs: {stack.log_dir}); Ctrl-C stops it",
              file=sys.stderr)
        try:
            while all(p.poll() is None for p in stack.procs):
                time.sleep(1.0)
            print("a FastChat process exited; stopping", file=sys.stderr)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
