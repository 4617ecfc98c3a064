"""`vicuna train sft` side by side with FastChat's trainer (fastchat/train/train.py, HF Trainer).

    python benchmarks/bench_train.py [--fastchat-venv DIR] [--models full tiny] [--rounds 2]
                                     [--warmup-steps 1] [--steps 3] [--global-batch 4] [--wait-idle 120]

Both arms get the same cleaned ShareGPT file (>= 500 conversations of mixed length made by
make_train_corpus.py and cleaned by `vicuna data clean -m MODEL -t vicuna_v1.1 --max-length 2048`),
the same model weights, the vicuna_v1.1 template (FastChat hard-codes it), max length 2048, the
same global batch in sequences, the same number of optimizer steps, gradient checkpointing, AdamW
at lr 2e-5 without warmup, fp32 (this CPU has no native bf16: bf16 matmuls are emulated and ~3x
slower than fp32, so neither arm uses it), and all CPU threads torch takes by default.

- FastChat: its own train() (`--use_cpu True`, padding every sample to `--model_max_length
  2048`, micro-batch 1 sequence of 2048 tokens, gradient accumulation = the global batch), run by
  this script in the FastChat venv (`--fastchat-child`, the same tokenizer patch as
  ../shared/peers/fastchat/train_fastchat.py) with a Trainer subclass that only counts what each
  micro-batch holds (labels != -100 after the shift, attention-mask tokens, samples whose labels
  are all -100) and times each optimizer step; saving the final model is skipped.
- vicuna: `vicuna train sft ... --max-steps N --global-batch-size B --gradient-checkpointing`
  (packing on, rows of at most 2048 tokens; its fused chunked loss with --kernels auto); per-step
  figures come from its RUN_DIR/metrics.jsonl.

Each arm runs in a fresh process, alternating FastChat, vicuna, FastChat, vicuna ... The first
`--warmup-steps` optimizer steps are not timed; supervised tokens/s = supervised tokens of the
timed steps / their wall time. Peak RSS = the larger of the child's ru_maxrss (os.wait4: the
kernel's high-water mark of the process and the descendants it waited for) and the peak of the
summed RSS of its whole process tree sampled every 0.2 s (psutil). Every round records the share
of the CPUs other processes took (ForeignCpu) and the load average.

Models: `full` = the embedded SmolLM2-135M-Instruct (30 layers) converted to safetensors
(`vicuna models pull`); `tiny` = its first 4 layers (same embeddings and tokenizer), built here.
FastChat loads copies made by ../shared/peers/fastchat/make_legacy_model.py.
"""

from __future__ import annotations

import sys

if len(sys.argv) > 1 and sys.argv[1] == "--fastchat-child":  # runs in the FastChat venv: stdlib + its deps only
    import json
    import time

    def _fastchat_child(result_path: str, hf_args: list[str]) -> None:
        import transformers

        transformers.PreTrainedTokenizerFast.legacy = False  # as train_fastchat.py: FastChat reads tokenizer.legacy
        import fastchat.train.train as ft

        out: dict = {"steps": [], "logs": []}
        step_counts: dict = {}
        marks: list[float] = []

        class Probe(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                marks.append(time.perf_counter())
                counts = step_counts.pop(state.global_step, {})
                out["steps"].append({"step": state.global_step, "end_s": marks[-1] - marks[0], **counts})

            def on_log(self, args, state, control, logs=None, **kw):
                out["logs"].append({"step": state.global_step, **(logs or {})})

        intended: dict = {}  # input_ids row bytes -> tokens FastChat MEANT to supervise

        def intended_counts(raw_path: str, tokenizer) -> None:
            """What FastChat's preprocess means to supervise (each assistant reply and its "</s>",
            the same prompt it builds), found by character offsets in its own tokenization rather
            than by its LLaMA-tuned token arithmetic, so the figure is right for any tokenizer."""
            conv = ft.get_conversation_template("vicuna")
            roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
            for record in json.load(open(raw_path)):
                source = record["conversations"]
                if roles[source[0]["from"]] != conv.roles[0]:
                    source = source[1:]
                conv.messages = []
                text, spans = conv.system_message + conv.sep, []
                for j, turn in enumerate(source):
                    conv.append_message(roles[turn["from"]], turn["value"])
                    text += roles[turn["from"]] + ": "
                    if j % 2:
                        spans.append((len(text), len(text) + len(turn["value"]) + len(conv.sep2)))
                    text += turn["value"] + (conv.sep, conv.sep2)[j % 2]
                assert text == conv.get_prompt(), "prompt reconstruction differs from FastChat's"
                enc = tokenizer(text, max_length=tokenizer.model_max_length, truncation=True,
                                return_offsets_mapping=True, padding="max_length", return_tensors="pt")
                starts = [s for s, _ in enc["offset_mapping"][0].tolist()]
                real = int(enc["attention_mask"][0].sum())
                n = sum(1 for k in range(1, real) if any(a <= starts[k] < b for a, b in spans))
                intended[enc["input_ids"][0].numpy().tobytes()] = n

        class CountingTrainer(ft.Trainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Probe())
                ds = self.train_dataset  # FastChat's non-lazy SupervisedDataset: every sample masked up front
                sup = (ds.labels[:, 1:] != ft.IGNORE_TOKEN_ID).sum(1)
                intended_counts(self._data_path, self.tokenizer)
                rows = [intended.get(r.numpy().tobytes()) for r in ds.input_ids]
                out["dataset"] = {
                    "samples": len(ds),
                    "fully_masked": int((sup == 0).sum()),
                    "supervised_tokens": int(sup.sum()),
                    "intended_supervised_tokens": sum(r or 0 for r in rows),
                    "intended_unmatched_rows": sum(r is None for r in rows),
                    "real_tokens": int(ds.attention_mask.sum()),
                    "padded_tokens": int(ds.input_ids.numel() - ds.attention_mask.sum()),
                    "length": int(ds.input_ids.shape[1]),
                }

            def training_step(self, model, inputs, *args, **kwargs):
                labels, mask = inputs["labels"], inputs["attention_mask"]
                sup = (labels[:, 1:] != ft.IGNORE_TOKEN_ID).sum(1)
                c = step_counts.setdefault(self.state.global_step + 1, {})
                meant = sum(intended.get(row.numpy().tobytes(), 0) for row in inputs["input_ids"].cpu())
                for key, value in (("supervised_tokens", int(sup.sum())), ("real_tokens", int(mask.sum())),
                                   ("tokens", labels.numel()), ("samples", labels.shape[0]),
                                   ("fully_masked", int((sup == 0).sum())), ("intended_supervised_tokens", meant)):
                    c[key] = c.get(key, 0) + value
                return super().training_step(model, inputs, *args, **kwargs)

        CountingTrainer._data_path = hf_args[hf_args.index("--data_path") + 1]

        ft.Trainer = CountingTrainer
        ft.trainer_save_model_safe = lambda trainer: None  # the benchmark measures training, not saving
        sys.argv = [sys.argv[0]] + hf_args
        ft.train()
        with open(result_path, "w") as f:
            json.dump(out, f)

    _fastchat_child(sys.argv[2], sys.argv[3:])
    sys.exit(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ForeignCpu,
    loadavg,
    machine_info,
    markdown_table,
    print_machine,
    summary,
    wait_for_idle,
    write_results,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = Path(os.environ.get("FASTCHAT_PEER_DIR", REPO.parent / "shared" / "peers" / "fastchat"))
VICUNA = Path(sys.executable).with_name("vicuna")
TEMPLATE = "vicuna_v1.1"
TINY_LAYERS = 4


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---------------------------------------------------------------- preparation (cached in --work-dir)

def prepare(args: argparse.Namespace) -> dict:
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VICUNA_HOME=str(args.vicuna_home))
    fc_python = args.fastchat_venv / "bin" / "python"
    if not fc_python.exists() or subprocess.run([fc_python, "-c", "import fastchat"], capture_output=True).returncode:
        run(["bash", PEER / "setup.sh", args.fastchat_venv])

    full = Path(subprocess.run([VICUNA, "models", "pull", "smollm2-135m-instruct"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip().splitlines()[-1])
    models = {"full": full}
    tiny = work / "tiny-model"
    if "tiny" in args.models and not (tiny / "config.json").exists():
        build_tiny(full, tiny)
    models["tiny"] = tiny
    legacy = {}
    for name in args.models:
        dst = work / f"legacy-{name}"
        if not (dst / "config.json").exists():
            run([fc_python, PEER / "make_legacy_model.py", models[name], dst])
        legacy[name] = dst

    raw, clean = work / "raw.json", work / "clean.json"
    if not clean.exists():
        run([sys.executable, HERE / "make_train_corpus.py", raw, "--seed", "0"])
        run([VICUNA, "data", "clean", raw, "-o", clean, "-m", full, "-t", TEMPLATE, "--max-length", args.max_length,
             "--report", work / "clean-report.json", "--overwrite"], env=env)
    n = len(json.loads(clean.read_text()))
    if n < 500:
        sys.exit(f"error: the cleaned corpus has {n} conversations, fewer than 500")
    return {"models": {k: models[k] for k in args.models}, "legacy": legacy, "data": clean, "conversations": n,
            "env": env, "fc_python": fc_python}


def build_tiny(full: Path, dst: Path) -> None:
    """The first TINY_LAYERS decoder layers of the full model (embeddings, norm and tokenizer as is)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(full, num_hidden_layers=TINY_LAYERS, dtype=torch.float32)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(full).save_pretrained(dst)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (full / extra).exists() and not (dst / extra).exists():
            shutil.copy(full / extra, dst / extra)
    print(f"tiny model ({TINY_LAYERS} layers) written: {dst}", flush=True)


# ---------------------------------------------------------------- one measured child process

class TreeRss:
    """Peak of the summed RSS of a process and all its descendants, sampled every `period` s."""

    def __init__(self, pid: int, period: float = 0.2):
        import psutil

        self.proc, self.period, self.peak = psutil.Process(pid), period, 0
        self.timeline: list[tuple[float, int]] = []  # (s since start, MB) once a second: when the peak happens
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                now = time.perf_counter() - self._t0
                if not self.timeline or now - self.timeline[-1][0] >= 1.0:
                    self.timeline.append((round(now, 1), total >> 20))
            except psutil.Error:
                return
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measured(cmd: list, log: Path, env: dict) -> dict:
    """Run `cmd` (stdout+stderr to `log`), return exit code, wall time, peak RSS and foreign CPU."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    load_before = loadavg()
    with open(log, "w") as out, ForeignCpu() as fc:
        started = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeRss(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        tree_peak = sampler.stop()
    return {"rss_timeline_mb": sampler.timeline, "returncode": proc.returncode, "wall_s": wall, "ru_maxrss_mb": usage.ru_maxrss / 1024,
            "tree_rss_peak_mb": tree_peak / 2**20, "peak_rss_mb": max(usage.ru_maxrss / 1024, tree_peak / 2**20),
            "foreign_cpu": fc.fraction, "load_before": load_before, "load_after": loadavg(), "log": str(log)}


def timed_window(steps: list[dict], warmup: int, end_key: str) -> tuple[float, list[dict]]:
    timed = [s for s in steps if s["step"] > warmup]
    start = next(s[end_key] for s in steps if s["step"] == warmup) if warmup else 0.0
    return timed[-1][end_key] - start, timed


def fastchat_arm(args: argparse.Namespace, prep: dict, model: str, tag: str) -> dict:
    out_dir = args.work_dir / "runs" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    result = out_dir / "probe.json"
    steps = args.warmup_steps + args.steps
    cmd = [prep["fc_python"], Path(__file__).resolve(), "--fastchat-child", result,
           "--model_name_or_path", prep["legacy"][model], "--data_path", prep["data"], "--output_dir", out_dir,
           "--model_max_length", args.max_length, "--per_device_train_batch_size", 1,
           "--gradient_accumulation_steps", args.global_batch, "--max_steps", steps,
           "--learning_rate", 2e-5, "--warmup_ratio", 0.0, "--lr_scheduler_type", "cosine", "--weight_decay", 0.0,
           "--gradient_checkpointing", True, "--use_cpu", True, "--bf16", False, "--seed", args.seed,
           "--logging_steps", 1, "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", True,
           "--dataloader_num_workers", 0]
    run_info = measured(cmd, out_dir / "log.txt", dict(prep["env"], TOKENIZERS_PARALLELISM="false"))
    if run_info["returncode"] != 0:
        return {"arm": "fastchat", "ok": False, **run_info}
    probe = json.loads(result.read_text())
    seconds, timed = timed_window(probe["steps"], args.warmup_steps, "end_s")
    sup = sum(s["supervised_tokens"] for s in timed)
    meant = sum(s["intended_supervised_tokens"] for s in timed)
    total = sum(s["tokens"] for s in timed)
    real = sum(s["real_tokens"] for s in timed)
    losses = [log.get("loss") for log in probe["logs"] if "loss" in log]
    return {"arm": "fastchat", "ok": True, **run_info, "timed_steps": len(timed), "timed_s": seconds,
            "steps_per_s": len(timed) / seconds, "supervised_tokens": sup, "real_tokens": real, "tokens": total,
            "supervised_tokens_per_s": sup / seconds, "real_tokens_per_s": real / seconds,
            "intended_supervised_tokens": meant, "intended_supervised_tokens_per_s": meant / seconds,
            "padding_share": (total - real) / total,
            "samples": sum(s["samples"] for s in timed), "fully_masked": sum(s["fully_masked"] for s in timed),
            "all_steps": probe["steps"], "losses": losses, "dataset": probe.get("dataset")}


def vicuna_arm(args: argparse.Namespace, prep: dict, model: str, tag: str) -> dict:
    out_dir = args.work_dir / "runs" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = args.warmup_steps + args.steps
    cmd = [VICUNA, "train", "sft", "-m", prep["models"][model], "--data", prep["data"], "-t", TEMPLATE,
           "--max-length", args.max_length, "-o", out_dir, "--max-steps", steps,
           "--global-batch-size", args.global_batch, "--micro-batch-size", 1, "--gradient-checkpointing",
           "--learning-rate", 2e-5, "--warmup-steps", 0, "--lr-schedule", "cosine", "--weight-decay", 0.0,
           "--precision", "fp32", "--seed", args.seed, "--log-every", 1, *args.vicuna_extra]
    log = args.work_dir / "runs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    run_info = measured(cmd, log, prep["env"])
    metrics_file = out_dir / "metrics.jsonl"
    if run_info["returncode"] != 0 or not metrics_file.exists():
        return {"arm": "vicuna", "ok": False, **run_info}
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "step_s" in r]
    elapsed, acc = [], 0.0
    for r in records:
        acc += r["step_s"]
        elapsed.append({**r, "end_s": acc})
    seconds, timed = timed_window(elapsed, args.warmup_steps, "end_s")
    sup = sum(r["supervised_tokens"] for r in timed)
    real = sum(r["tokens"] for r in timed)
    return {"arm": "vicuna", "ok": True, **run_info, "timed_steps": len(timed), "timed_s": seconds,
            "steps_per_s": len(timed) / seconds, "supervised_tokens": sup, "real_tokens": real,
            "supervised_tokens_per_s": sup / seconds, "real_tokens_per_s": real / seconds,
            "losses": [r.get("loss") for r in records], "all_steps": records}


# ---------------------------------------------------------------- report

def med(rows: list[dict], key: str) -> float:
    return summary([r[key] for r in rows])["median"]


def _ratio(a: float, b: float) -> str:
    return "inf (FastChat supervised 0 tokens)" if b == 0 else f"{a / b:.2f}x"


def report(results: dict) -> str:
    lines = []
    for model, rounds in results["rounds"].items():
        fc = [r for r in rounds if r["arm"] == "fastchat" and r["ok"]]
        vc = [r for r in rounds if r["arm"] == "vicuna" and r["ok"]]
        ds = fc[0].get("dataset") if fc else None
        share = ds["intended_supervised_tokens"] / ds["real_tokens"] if ds else None
        lines.append(f"\n### {model} model\n")
        rows = []
        for r in rounds:
            if not r["ok"]:
                rows.append([r["round"], r["arm"], f"FAILED (exit {r['returncode']}, log {r['log']})"] + [""] * 11)
                continue
            fcarm = r["arm"] == "fastchat"
            rows.append([
                r["round"], r["arm"], f"{r['supervised_tokens_per_s']:.1f}",
                f"{r['intended_supervised_tokens_per_s']:.1f}" if fcarm else "-",
                f"{r['real_tokens_per_s']:.1f}", f"{r['timed_s'] / r['timed_steps']:.1f}",
                f"{r['supervised_tokens']}" + (f" ({r['intended_supervised_tokens']} meant)" if fcarm else ""),
                f"{r['fully_masked']}/{r['samples']}" if fcarm else "-",
                f"{r['padding_share']:.1%}" if fcarm else "0 (packed)",
                f"{r['peak_rss_mb']:.0f}", f"{r['ru_maxrss_mb']:.0f} / {r['tree_rss_peak_mb']:.0f}",
                f"{r['foreign_cpu']:.0%}", r["load_before"], f"{r['wall_s']:.0f}"])
        lines.append(markdown_table(
            ["round", "arm", "supervised tok/s", "FastChat meant tok/s", "real tok/s", "s/step",
             "supervised tokens, timed steps", "fully masked samples", "padding share", "peak RSS MB",
             "ru_maxrss / tree MB", "others' CPU", "load 1/5/15 before", "process wall s"], rows))
        if not (fc and vc):
            continue
        v_sup, f_sup = med(vc, "supervised_tokens_per_s"), med(fc, "supervised_tokens_per_s")
        f_meant = med(fc, "intended_supervised_tokens_per_s")
        ratio_rss = med(vc, "peak_rss_mb") / med(fc, "peak_rss_mb")
        lines.append("")
        lines.append(f"- supervised tokens/s, vicuna / FastChat as it runs (medians {v_sup:.1f} / {f_sup:.1f}): "
                     f"**{_ratio(v_sup, f_sup)}**")
        lines.append(f"- supervised tokens/s, vicuna / FastChat had its masks been right (medians {v_sup:.1f} / "
                     f"{f_meant:.1f}): **{_ratio(v_sup, f_meant)}** (goal >= 2x: "
                     f"{'PASS' if f_meant and v_sup / f_meant >= 2 else 'FAIL'})")
        if share is not None:
            # Which samples a 3-step run draws is luck; FastChat's step time does not depend on them
            # (every sample is padded to max length), vicuna's throughput per real token barely does.
            f_norm = med(fc, "steps_per_s") * results["global_batch"] * ds["intended_supervised_tokens"] / ds["samples"]
            v_norm = med(vc, "real_tokens_per_s") * share
            lines.append(f"- the same, normalised to the whole file's mix (FastChat: steps/s x batch x mean meant "
                         f"supervised tokens per sample; vicuna: real tokens/s x the file's supervised share "
                         f"{share:.1%}): {v_norm:.1f} / {f_norm:.1f} = **{_ratio(v_norm, f_norm)}** (goal >= 2x: "
                         f"{'PASS' if f_norm and v_norm / f_norm >= 2 else 'FAIL'})")
        lines.append(f"- real (non-padding) tokens/s, vicuna / FastChat: "
                     f"{_ratio(med(vc, 'real_tokens_per_s'), med(fc, 'real_tokens_per_s'))}")
        lines.append(f"- optimizer steps/s, vicuna / FastChat: {_ratio(med(vc, 'steps_per_s'), med(fc, 'steps_per_s'))}")
        lines.append(f"- peak RSS, vicuna / FastChat (medians {med(vc, 'peak_rss_mb'):.0f} / {med(fc, 'peak_rss_mb'):.0f} MB): "
                     f"**{ratio_rss:.2f}x** (goal <= 0.6x: {'PASS' if ratio_rss <= 0.6 else 'FAIL'})")
        lines.append(f"- FastChat's padding share of the tokens it processed in the timed steps: {med(fc, 'padding_share'):.1%}")
        if ds:
            lines.append(f"- FastChat's own masks over the whole cleaned file: {ds['fully_masked']} of {ds['samples']} samples "
                         f"fully masked ('tokenization mismatch'), {ds['supervised_tokens']} supervised tokens; it meant "
                         f"{ds['intended_supervised_tokens']} of {ds['real_tokens']} real tokens; padding "
                         f"{ds['padded_tokens'] / (ds['padded_tokens'] + ds['real_tokens']):.1%} of all it would process")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vicuna-bench-train"),
                        help="models, data and runs (cached between invocations)")
    parser.add_argument("--vicuna-home", type=Path, default=Path(os.environ.get("VICUNA_HOME", "/tmp/vicuna-bench-train/home")))
    parser.add_argument("--fastchat-venv", type=Path, default=REPO / ".peers" / "fastchat-venv")
    parser.add_argument("--models", nargs="+", choices=["full", "tiny"], default=["tiny", "full"])
    parser.add_argument("--arms", nargs="+", choices=["fastchat", "vicuna"], default=["fastchat", "vicuna"])
    parser.add_argument("--rounds", type=int, default=2, help="FastChat/vicuna pairs per model")
    parser.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps not timed")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per optimizer step")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-idle", type=float, default=0, help="before each run, wait up to S s for a quiet machine")
    parser.add_argument("--vicuna-extra", nargs=argparse.REMAINDER, default=[], help="extra `vicuna train sft` flags (last)")
    parser.add_argument("--prepare-only", action="store_true", help="build models and data, then stop")
    parser.add_argument("--report-only", metavar="JSON", help="print the report of a (partial) results file and stop")
    parser.add_argument("--results", help="JSON path (default benchmarks/records/bench_train-<time>.json)")
    args = parser.parse_args()

    if args.report_only:
        print(report(json.loads(Path(args.report_only).read_text())))
        return
    info = machine_info()
    print_machine(info)
    prep = prepare(args)
    print(f"data: {prep['data']} ({prep['conversations']} conversations) · models: "
          + ", ".join(f"{k}={v}" for k, v in prep["models"].items()), flush=True)
    if args.prepare_only:
        return
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "data": str(prep["data"]),
               "global_batch": args.global_batch,
               "conversations": prep["conversations"], "rounds": {}}
    arms = {"fastchat": fastchat_arm, "vicuna": vicuna_arm}
    for n in range(1, args.rounds + 1):  # rounds outermost: a run cut short still has whole pairs
        for model in args.models:
            rounds = results["rounds"].setdefault(model, [])
            for arm in args.arms:
                idle = wait_for_idle(args.wait_idle)
                r = arms[arm](args, prep, model, f"{model}-{arm}-{n}")
                r.update(round=n, model=model, idle=idle)
                rounds.append(r)
                if r["ok"]:
                    print(f"[{model} round {n}] {arm}: {r['supervised_tokens_per_s']:.1f} supervised tok/s · "
                          f"{r['steps_per_s']:.4f} steps/s · peak RSS {r['peak_rss_mb']:.0f} MB · "
                          f"others' CPU {r['foreign_cpu']:.0%} · load {r['load_before']}", flush=True)
                else:
                    print(f"[{model} round {n}] {arm}: FAILED, exit {r['returncode']}, see {r['log']}", flush=True)
                write_results("bench_train", results, args.results or str(args.work_dir / "partial.json"))
    text = report(results)
    print(text)
    results["report"] = text
    path = write_results("bench_train", results, args.results)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
