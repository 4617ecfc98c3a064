#!/usr/bin/env python3
"""Peer engines for the decode benchmark (issue #16): llama.cpp (llama-cpp-python) and CTranslate2.

They are NOT vicuna or CI dependencies: they live in a separate benchmark venv (default
/work/benchvenv, env VICUNA_BENCH_VENV), with the embedded model converted once into a cache
(default /tmp/peers-models, env VICUNA_PEERS_MODELS). One command makes both, idempotently
(~15 min the first time on 2 shared cores: llama-cpp-python compiles llama.cpp from source, niced):

    VICUNA_HOME=/tmp/vh python3 benchmarks/peers_decode.py --setup

  venv      torch (CPU) + ctranslate2 + transformers + gguf + llama-cpp-python, pinned below
  ct2-*     ct2-transformers-converter's Python API: float32 and int8 copies of the model
  *.gguf    llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist's vendored
            llama.cpp) to F32, then llama_model_quantize (the Python binding) to Q4_1

bench_decode.py --peers llama.cpp ct2 then starts one worker per peer arm, under the bench venv's
python, so the arms can be interleaved with vicuna's in the same rounds:

    /work/benchvenv/bin/python benchmarks/peers_decode.py --worker ct2:int8 --threads 2

The worker loads once, prints a JSON "ready" line (engine, version, quantization, threads), then
answers JSON lines {"ids": [...], "tokens": N, "force": true} with one timed greedy run each:
exactly N new tokens when forced (llama.cpp: EOS is not a stop; CTranslate2: min_length=N masks
it, as model.generate's min_new_tokens does), decode tok/s = (N - 1) / (last token time - first
token time), the same definition as the other arms. Prompt token ids come from the caller, so every
arm decodes the same prompt. Raw token ids only: the peers do not detokenize (vicuna's engine does,
so the comparison slightly favours the peers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import decode_timing  # noqa: E402  (stdlib only: it runs in the bench venv too)

VENV = Path(os.environ.get("VICUNA_BENCH_VENV", "/work/benchvenv"))
MODELS = Path(os.environ.get("VICUNA_PEERS_MODELS", "/tmp/peers-models"))
MODEL_NAME = "smollm2-135m-instruct"
# Pinned so that a rerun measures the same peers; the CPU torch wheel lies on this machine's disk.
PINS = ["torch==2.13.0", "ctranslate2==4.8.5", "transformers==5.24.0", "gguf==0.19.0", "sentencepiece==0.2.3"]
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
# `--peers` names -> the arms they add: (engine, quantization); "engine:quant" picks one.
PEER_ARMS = {"llama.cpp": [("llama.cpp", "Q4_1")], "ct2": [("ct2", "float32"), ("ct2", "int8")]}
GGUF_FTYPES = {"Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


class PeerError(Exception):
    """A peer arm cannot run (not set up, or its worker failed): one line for the user."""


def model_path(engine: str, quant: str) -> Path:
    if engine == "ct2":
        return MODELS / f"ct2-{quant}"
    return MODELS / f"{MODEL_NAME}-{quant.lower()}.gguf"


def parse_peers(specs: list[str]) -> list[tuple[str, str]]:
    """["llama.cpp", "ct2:int8"] -> [("llama.cpp", "Q4_1"), ("ct2", "int8")]."""
    arms: list[tuple[str, str]] = []
    for spec in specs:
        engine, _, quant = spec.partition(":")
        if engine not in PEER_ARMS:
            raise PeerError(f"unknown peer {spec!r} (choose from {', '.join(PEER_ARMS)}, optionally :QUANT)")
        for arm in [(engine, quant)] if quant else PEER_ARMS[engine]:
            if arm not in arms:
                arms.append(arm)
    return arms


def arm_name(engine: str, quant: str) -> str:
    return engine if engine == "llama.cpp" else f"{engine}-{quant}"


# ---------------------------------------------------------------- client side (any python, stdlib only)


def peer_label(meta: dict) -> str:
    """A worker's "ready" line as a table label."""
    if meta["engine"] == "llama.cpp":
        return f"llama.cpp (llama-cpp-python {meta['version']}, {meta['quantization']} GGUF, {meta['threads']} threads)"
    return f"CTranslate2 ({meta['version']}, {meta['compute_type']} compute, {meta['threads']} threads)"


class PeerWorker:
    """One peer arm: a worker subprocess of the bench venv's python that loaded the model once."""

    def __init__(self, engine: str, quant: str, threads: int):
        self.name = arm_name(engine, quant)
        python = VENV / "bin" / "python"
        missing = [p for p in (python, model_path(engine, quant)) if not p.exists()]
        if missing:
            raise PeerError(f"{self.name}: {missing[0]} is missing; run `python3 benchmarks/peers_decode.py --setup` "
                            "once (it builds the peer venv and models)")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--worker", f"{engine}:{quant}", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self.pid = self.proc.pid
        self.meta = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise PeerError(f"{self.name} worker exited with code {code} (its error is above)")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"{self.name} worker: {reply['error']}")
        return reply

    def run(self, ids: list[int], tokens: int, force: bool = True) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "tokens": tokens, "force": force}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------- worker side (the bench venv)


def timed(stream, tokens: int, stop: set[int], start: float) -> dict:
    """Consume a token-id stream, timestamping each new token; stop after `tokens` or at a `stop` id."""
    ids, times = [], []
    for tok in stream:
        times.append(time.perf_counter())
        ids.append(int(tok))
        if len(ids) >= tokens or tok in stop:
            break
    return decode_timing(ids, times, start, time.perf_counter() - start)


def llama_cpp_runner(path: Path, threads: int):
    import llama_cpp

    # n_ctx: the prompt plus --tokens fits with room; n_batch 512 is llama.cpp's default prefill chunk.
    llm = llama_cpp.Llama(str(path), n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    eos = {llm.token_eos()}
    meta = {"version": llama_cpp.__version__, "n_ctx": 4096, "system_info": llama_cpp.llama_print_system_info().decode()}

    def run(ids: list[int], tokens: int, force: bool) -> dict:
        start = time.perf_counter()
        llm.reset()  # no KV-cache reuse from the previous run: every run prefills the whole prompt
        stream = llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True)
        try:
            return timed(stream, tokens, set() if force else eos, start)
        finally:
            stream.close()

    return run, meta


def ct2_runner(path: Path, threads: int):
    import ctranslate2

    gen = ctranslate2.Generator(str(path), device="cpu", compute_type="default", intra_threads=threads, inter_threads=1)
    vocab = json.loads((path / "vocabulary.json").read_text())  # token strings in id order
    meta = {"version": ctranslate2.__version__, "compute_type": gen.compute_type}

    def run(ids: list[int], tokens: int, force: bool) -> dict:
        start = time.perf_counter()
        kwargs = {"min_length": tokens} if force else {}
        stream = (step.token_id for step in gen.generate_tokens(
            [vocab[i] for i in ids], max_length=tokens, sampling_topk=1, **kwargs))
        return timed(stream, tokens, set(), start)

    return run, meta


def serve(spec: str, threads: int) -> None:
    # The protocol gets its own copy of stdout; fd 1 then points at stderr so that anything the
    # native libraries print cannot corrupt it.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    engine, quant = parse_peers([spec])[0]
    path = model_path(engine, quant)
    try:
        run, meta = (llama_cpp_runner if engine == "llama.cpp" else ct2_runner)(path, threads)
    except Exception as e:  # report it to the parent as one line instead of a dead pipe
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        raise SystemExit(1)
    out.write(json.dumps({"engine": engine, "quantization": quant, "threads": threads, "model": str(path), **meta}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(run(req["ids"], req["tokens"], req.get("force", True))) + "\n")


# ---------------------------------------------------------------- set-up (any python3)


def sh(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def setup(model_dir: Path) -> None:
    py = VENV / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(py), "-m", "pip", "install", "-q"]
    sh(pip + PINS[:1])  # torch first, so that nothing pulls a different build
    sh(pip + PINS[1:])
    # llama-cpp-python builds llama.cpp (-march=native) from its sdist: niced, 2 jobs, so that
    # other benchmarks on the machine keep priority.
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    sh(["nice", "-n", "19", *pip, LLAMA_CPP_PIN], env=env)
    sh([str(py), str(Path(__file__).resolve()), "--convert", "--model-dir", str(model_dir)])


def convert(model_dir: Path) -> None:
    """Runs in the bench venv: the converted models, each only when missing."""
    MODELS.mkdir(parents=True, exist_ok=True)
    for _, quant in PEER_ARMS["ct2"]:
        out = model_path("ct2", quant)
        if not (out / "model.bin").exists():
            print(f"converting to CTranslate2 {quant} -> {out}", flush=True)
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(str(model_dir)).convert(str(out), quantization=quant, force=True)
    f32 = model_path("llama.cpp", "F32")
    if not f32.exists():
        script = llama_cpp_convert_script()
        sh([sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(f32)])
    for quant, ftype in GGUF_FTYPES.items():
        out = model_path("llama.cpp", quant)
        if quant in {q for _, q in PEER_ARMS["llama.cpp"]} and not out.exists():
            import ctypes

            import llama_cpp

            print(f"quantizing {f32.name} -> {out.name}", flush=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype)
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"error: llama_model_quantize to {quant} failed")
    print(f"peer models ready in {MODELS}:", ", ".join(sorted(p.name for p in MODELS.iterdir())))


def llama_cpp_convert_script() -> Path:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (its vendored llama.cpp, with the
    matching gguf-py), so the GGUF format matches the library that reads it."""
    import tarfile

    import llama_cpp

    src = MODELS / "src"
    root = src / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    if not script.exists():
        src.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(src)])
        with tarfile.open(src / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz") as tar:
            prefix = f"llama_cpp_python-{llama_cpp.__version__}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(tuple(
                prefix + p for p in ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")))]
            tar.extractall(src, members=members, filter="data")
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--setup", action="store_true", help=f"build {VENV} and the converted models (idempotent)")
    mode.add_argument("--convert", action="store_true", help="only the model conversions (run by --setup in the venv)")
    mode.add_argument("--worker", metavar="ENGINE[:QUANT]", help="serve timed runs on stdin/stdout (bench_decode.py)")
    home = Path(os.environ.get("VICUNA_HOME", Path.home() / ".vicuna"))
    parser.add_argument("--model-dir", type=Path, default=home / "models" / MODEL_NAME,
                        help="the transformers checkpoint to convert (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads")
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.threads)
        return
    if not (args.model_dir / "config.json").exists():
        parser.exit(2, f"error: no checkpoint at {args.model_dir}\nhint: set VICUNA_HOME or pass --model-dir\n")
    try:
        setup(args.model_dir) if args.setup else convert(args.model_dir)
    except subprocess.CalledProcessError as e:
        parser.exit(1, f"error: step failed ({e.returncode}): {' '.join(map(str, e.cmd))}\n")


if __name__ == "__main__":
    main()
