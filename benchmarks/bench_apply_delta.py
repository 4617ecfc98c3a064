#!/usr/bin/env python
"""apply-delta: peak RSS and wall time of `vicuna apply-delta` against FastChat's
`python -m fastchat.model.apply_delta` (normal and --low-cpu-mem), on a synthetic ~1.1B-parameter
fp16 Llama-shaped model (TinyLlama's shape: hidden 2048, 22 layers, vocab 32000) in 4 shards.

Each round runs, as fresh processes under /usr/bin/time (peak RSS = its "Maximum resident set size"):

  A  vicuna apply-delta --base base-st --delta delta-st -o OUT        (safetensors inputs)
  B  fastchat apply_delta (normal: both models in RAM) on the same safetensors inputs
  C  fastchat apply_delta --low-cpu-mem on .bin inputs (it only reads pytorch_model-*.bin)
  D  vicuna apply-delta on the same .bin inputs as C
  E  cp -r of a 2.2 GB model dir: the disk ceiling for writing the output's bytes
  F  the same cp -r followed by sync: the ceiling for writing them durably (vicuna fsyncs its shards)

interleaved, with the order reversed every other round. Before each run its inputs are read once
(untimed) so that every contender starts from a warm page cache: this machine's shared disk reads
cold files at 30-300 MB/s depending on what else runs, which would swamp the difference between
tools. Before the timed rounds, vicuna's output is compared tensor by tensor with FastChat's
(`vicuna apply-delta --check FASTCHAT_OUT`).

The inputs are written once to /tmp/vicuna-bench-delta (~9 GB: safetensors and .bin copies of the
base and the delta) and reused. FastChat runs from the venv that ../shared/peers/fastchat/setup.sh
builds (default /tmp/fastchat-venv). Example:

    python benchmarks/bench_apply_delta.py --rounds 3

Goals: vicuna's peak RSS <= 0.2x FastChat normal and <= 0.5x FastChat --low-cpu-mem; wall time
<= 1x FastChat normal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignCpu, machine_info, markdown_table, print_machine, summary, write_results  # noqa: E402

DATA = Path("/tmp/vicuna-bench-delta")
SHAPE = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000}
SHARDS = 4
GOALS = {"rss_vs_normal": 0.2, "rss_vs_lowmem": 0.5, "wall_vs_normal": 1.0}


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["hidden"] // SHAPE["heads"] * SHAPE["kv_heads"]
    shapes = [("model.embed_tokens.weight", (SHAPE["vocab"], h))]
    for n in range(SHAPE["layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (SHAPE["vocab"], h))]


def split(shapes: list, parts: int) -> list[list]:
    total = sum(_numel(s) for _, s in shapes)
    shards, size = [[]], 0
    for name, shape in shapes:
        if size >= total / parts * len(shards) and len(shards) < parts:
            shards.append([])
        shards[-1].append((name, shape))
        size += _numel(shape)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_inputs(vicuna_python: str) -> None:
    """base-st, delta-st (safetensors) and base-bin, delta-bin (.bin), each 4 shards + index."""
    if (DATA / ".complete").exists():
        return
    print(f"writing the synthetic models to {DATA} (once) ...", flush=True)
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    (DATA / "shards.json").write_text(json.dumps(split(tensor_shapes(), SHARDS)))
    subprocess.run([vicuna_python, "-c", GENERATE, str(DATA)], check=True)
    (DATA / ".complete").write_text("ok\n")


# Runs in a child process (torch, safetensors, sentencepiece from vicuna's venv), one shard in memory.
GENERATE = r"""
import json, sys
from pathlib import Path
import sentencepiece as spm
import torch
from safetensors.torch import save_file

data = Path(sys.argv[1])
shards = json.loads((data / "shards.json").read_text())
words = "the model base delta weight vicuna llama apply shard tensor token chat answer question".split()
corpus = data / "corpus.txt"
corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)))
spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(data / "sp"), vocab_size=60, model_type="bpe",
                               bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
          "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
          "torch_dtype": "float16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}
for role, scale, seed in (("base", 0.02, 1), ("delta", 0.002, 2)):
    generator = torch.Generator().manual_seed(seed)
    for kind in ("st", "bin"):
        out = data / f"{role}-{kind}"
        out.mkdir()
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (out / "tokenizer.model").write_bytes((data / "sp.model").read_bytes())
    weight_map = {"st": {}, "bin": {}}
    for i, shard in enumerate(shards):
        tensors = {name: (torch.randn(shape, generator=generator) * scale).half() for name, shape in shard}
        st, pt = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        save_file(tensors, data / f"{role}-st" / st, metadata={"format": "pt"})
        torch.save(tensors, data / f"{role}-bin" / pt)
        weight_map["st"].update(dict.fromkeys(tensors, st))
        weight_map["bin"].update(dict.fromkeys(tensors, pt))
        print(f"  {role} shard {i + 1}/{len(shards)}", flush=True)
    for kind, index in (("st", "model.safetensors.index.json"), ("bin", "pytorch_model.bin.index.json")):
        (data / f"{role}-{kind}" / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map[kind]}))
"""


def warm(argv: list[str]) -> None:
    """Read every input file of a run once, so that it starts from a warm page cache."""
    for arg in argv:
        path = Path(arg)
        if path.is_dir() and path.parent == DATA and path.name != "out":
            for file in sorted(path.iterdir()):
                with open(file, "rb", buffering=0) as f:
                    while f.read(1 << 24):
                        pass


def timed(argv: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Wall time and peak RSS of one process (GNU time's maximum resident set size)."""
    stats = DATA / "time.txt"
    start = time.perf_counter()
    with open(log, "w") as out, ForeignCpu() as foreign:
        proc = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%M", *argv],
                              stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{log.read_text()[-3000:]}")
    rss_kb = int(stats.read_text().split()[-1])
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "foreign_cpu": foreign.fraction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fastchat-venv", default="/tmp/fastchat-venv")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/records/...)")
    args = parser.parse_args()

    fastchat_python = str(Path(args.fastchat_venv) / "bin" / "python")
    if not Path(fastchat_python).exists():
        sys.exit(f"no FastChat venv at {args.fastchat_venv}: bash ../shared/peers/fastchat/setup.sh {args.fastchat_venv}")
    info = machine_info()
    print_machine(info)
    make_inputs(sys.executable)
    out, logs = DATA / "out", DATA / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    vicuna = [sys.executable, "-m", "vicuna_cli", "apply-delta"]
    fastchat = [fastchat_python, "-m", "fastchat.model.apply_delta"]
    runs = {
        "vicuna (safetensors)": vicuna + ["--base", str(DATA / "base-st"), "--delta", str(DATA / "delta-st"), "-o", str(out)],
        "fastchat normal (safetensors)": fastchat + ["--base-model-path", str(DATA / "base-st"),
                                                     "--delta-path", str(DATA / "delta-st"), "--target-model-path", str(out)],
        "fastchat --low-cpu-mem (.bin)": fastchat + ["--base-model-path", str(DATA / "base-bin"), "--delta-path",
                                                     str(DATA / "delta-bin"), "--target-model-path", str(out), "--low-cpu-mem"],
        "vicuna (.bin)": vicuna + ["--base", str(DATA / "base-bin"), "--delta", str(DATA / "delta-bin"), "-o", str(out)],
        "cp -r (disk ceiling)": ["cp", "-r", str(DATA / "delta-st"), str(out)],
        # vicuna fsyncs every shard before it renames the output into place; cp and FastChat do not.
        "cp -r + sync (durable ceiling)": ["sh", "-c", f"cp -r {DATA / 'delta-st'} {out} && sync {out}/*"],
    }
    output_bytes = sum(p.stat().st_size for p in (DATA / "delta-st").glob("*.safetensors"))

    # Untimed: vicuna's result must equal FastChat's, tensor for tensor.
    reference = DATA / "fastchat-reference"
    if not reference.exists():
        timed(runs["fastchat normal (safetensors)"][:-1] + [str(reference)], env, logs / "reference.log")
    shutil.rmtree(out, ignore_errors=True)
    timed(runs["vicuna (safetensors)"] + ["--check", str(reference)], {**env, "COLUMNS": "300"}, logs / "check.log")
    verdict = [line.strip(" │").split("│")[-1].strip() for line in (logs / "check.log").read_text().splitlines()
               if "identical" in line]  # exit 0 already means no mismatch
    print(f"cross-check, vicuna apply-delta --check FASTCHAT_OUTPUT: {verdict[0] if verdict else 'see ' + str(logs / 'check.log')}")

    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)  # earlier runs' dirty pages must not slow this one
            warm(runs[name])
            results[name].append(timed(runs[name], env, logs / f"{r}-{name.split()[0]}.log"))
            m = results[name][-1]
            print(f"round {r + 1} {name}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"other processes {m['foreign_cpu']:.0%} CPU", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    med = {name: {k: summary([m[k] for m in ms])["median"] for k in ("wall_s", "peak_rss_mb", "foreign_cpu")}
           for name, ms in results.items()}
    v, vb = med["vicuna (safetensors)"], med["vicuna (.bin)"]
    normal, low = med["fastchat normal (safetensors)"], med["fastchat --low-cpu-mem (.bin)"]
    ratios = {
        "rss_vs_normal": v["peak_rss_mb"] / normal["peak_rss_mb"],
        "rss_vs_lowmem": vb["peak_rss_mb"] / low["peak_rss_mb"],
        "wall_vs_normal": v["wall_s"] / normal["wall_s"],
        "rss_st_vs_lowmem": v["peak_rss_mb"] / low["peak_rss_mb"],
        "wall_bin_vs_lowmem": vb["wall_s"] / low["wall_s"],
    }
    rows = [(name, f"{m['wall_s']:.1f}", f"{output_bytes / m['wall_s'] / 1e6:.0f}", f"{m['peak_rss_mb']:.0f}",
             f"{m['foreign_cpu']:.0%}") for name, m in med.items()]
    print()
    print(markdown_table(["run (median of %d)" % args.rounds, "wall s", "MB/s of output", "peak RSS MB",
                          "CPU taken by others"], rows))
    print()
    for key, value in ratios.items():
        goal = GOALS.get(key)
        print(f"{key}: {value:.3f}" + (f" (goal <= {goal}: {'met' if value <= goal else 'NOT met'})" if goal else ""))
    path = write_results("apply_delta", {"machine": info, "output_bytes": output_bytes, "runs": results,
                                         "medians": med, "ratios": ratios, "cross_check": verdict}, args.json)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
