"""Readers of issue 13: OASST1 trees → conversations, GPT4All, and the preference readers
(HH-RLHF, SHP, OASST1 ranked siblings, generic) → one pairwise JSONL, from hand-made fixtures that
follow the real schemas and from the real HH-RLHF harmless-base test split."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.data.pipeline import CleanConfig, clean
from vicuna_cli.data.preferences import PairsConfig, pairs, read_pairs
from vicuna_cli.train.dataset import read_conversations

HH = Path("/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz")


def msg(mid, parent, role, text, rank=None, tree="t1", **extra):
    return {"message_id": mid, "parent_id": parent, "message_tree_id": tree, "role": role, "text": text,
            "lang": "en", "rank": rank, "deleted": False, "review_result": True, "synthetic": False, **extra}


# t1: a prompt with three ranked answers; the best one has two ranked follow-ups... and debris.
OASST = [
    msg("p", None, "prompter", "What is the capital of France?"),
    msg("a0", "p", "assistant", "Paris is the capital of France.", rank=0),
    msg("a1", "p", "assistant", "It is Paris.", rank=1),
    msg("a2", "p", "assistant", "Lyon.", rank=2),
    msg("q", "a0", "prompter", "And of Italy?"),
    msg("b1", "q", "assistant", "Rome, I think.", rank=1),
    msg("b0", "q", "assistant", "Rome is the capital of Italy.", rank=0),
    msg("x", "a1", "prompter", "deleted follow-up", deleted=True),
    msg("orphan", "missing", "assistant", "I answer nothing"),
    msg("p2", None, "prompter", "Say hi", tree="t2"),
    msg("h", "p2", "assistant", "Hi!", tree="t2"),
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_oasst_table_best_and_all_paths(tmp_path):
    source = write_jsonl(tmp_path / "oasst.jsonl", OASST)
    notes: Counter = Counter()
    best = read_conversations([str(source)], notes)
    assert [(c.id, [m["content"] for m in c.messages]) for c in best] == [
        ("b0", ["What is the capital of France?", "Paris is the capital of France.", "And of Italy?",
                "Rome is the capital of Italy."]),
        ("h", ["Say hi", "Hi!"]),
    ]
    assert notes == {"orphan message (parent missing)": 1, "deleted message": 1}
    every = read_conversations([str(source)], Counter(), oasst_paths="all")
    assert [c.id for c in every] == ["b0", "b1", "a1", "a2", "h"]
    assert [m["role"] for m in every[0].messages] == ["user", "assistant", "user", "assistant"]


def test_oasst_tree_export_equals_the_table(tmp_path):
    def nest(mid):
        node = {k: v for k, v in next(m for m in OASST if m["message_id"] == mid).items() if k != "parent_id"}
        node["replies"] = [nest(m["message_id"]) for m in OASST if m["parent_id"] == mid]
        return node

    trees = [{"message_tree_id": "t1", "prompt": nest("p")}, {"message_tree_id": "t2", "prompt": nest("p2")}]
    table = read_conversations([str(write_jsonl(tmp_path / "table.jsonl", OASST))], Counter(), "all")
    nested = read_conversations([str(write_jsonl(tmp_path / "trees.jsonl", trees))], Counter(), "all")
    assert nested == table


def test_data_clean_reads_oasst_and_gpt4all_and_counts_orphans(tmp_path):
    oasst = write_jsonl(tmp_path / "oasst.jsonl", OASST)
    gpt4all = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "Write a haiku about rain", "response": "Soft rain on the roof", "source": "laion/unified_chip2"},
        {"prompt": "broken", "source": "x"}])
    out = tmp_path / "out.jsonl"
    report = clean(CleanConfig(inputs=[str(oasst)], output=out, oasst_paths="all", min_chars=0))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["b0", "b1", "a1", "a2", "h"]
    assert records[0]["lang"] == "en" and records[0]["conversations"][0] == {"from": "human", "value": OASST[0]["text"]}
    assert report.to_dict()["steps"][0]["dropped"] == {"orphan message (parent missing)": 1, "deleted message": 1}
    out2 = tmp_path / "g-out.jsonl"
    report = clean(CleanConfig(inputs=[str(gpt4all)], output=out2, min_chars=0))
    record = json.loads(out2.read_text())
    assert record["conversations"] == [{"from": "human", "value": "Write a haiku about rain"},
                                       {"from": "gpt", "value": "Soft rain on the roof"}]
    assert record["source"] == "laion/unified_chip2"
    assert report.to_dict()["steps"][0]["dropped"] == {"gpt4all record without string 'prompt' and 'response'": 1}
    with pytest.raises(VicunaError, match=r"g.jsonl record 2 \(line 2\) has the wrong shape"):
        clean(CleanConfig(inputs=[str(gpt4all)], output=tmp_path / "strict.jsonl", strict=True))
    assert not (tmp_path / "strict.jsonl").exists()


def test_oasst_ranked_siblings_become_pairs(tmp_path):
    source = write_jsonl(tmp_path / "oasst.jsonl", OASST)
    out = tmp_path / "pairs.jsonl"
    report = pairs(PairsConfig(inputs=[str(source)], output=out))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in got] == [
        ("a0>a1", "Paris is the capital of France.", "It is Paris."),
        ("a0>a2", "Paris is the capital of France.", "Lyon."),
        ("a1>a2", "It is Paris.", "Lyon."),
        ("b0>b1", "Rome is the capital of Italy.", "Rome, I think."),
    ]
    assert [m["content"] for m in got[3]["prompt"]] == [
        "What is the capital of France?", "Paris is the capital of France.", "And of Italy?"]
    assert report.to_dict()["steps"][0]["dropped"] == {"orphan message (parent missing)": 1, "deleted message": 1}


def test_shp_orders_by_label_filters_by_ratio_and_counts_bad_labels(tmp_path):
    def shp(i, label, a, b, **extra):
        return {"post_id": f"p{i}", "domain": "askscience_train", "history": f"Question {i}?", "c_root_id_A": f"A{i}",
                "c_root_id_B": f"B{i}", "human_ref_A": f"answer A{i}", "human_ref_B": f"answer B{i}",
                "labels": label, "score_A": a, "score_B": b, "score_ratio": max(a, b) / min(a, b), **extra}

    source = write_jsonl(tmp_path / "shp.jsonl", [shp(0, 1, 10, 2), shp(1, 0, 3, 9), shp(2, 1, 3, 2), shp(3, 2, 5, 1)])
    out = tmp_path / "pairs.jsonl"
    report = pairs(PairsConfig(inputs=[str(source)], output=out)).to_dict()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [
        {"id": "A0:shp_0", "prompt": [{"role": "user", "content": "Question 0?"}],
         "chosen": [{"role": "assistant", "content": "answer A0"}],
         "rejected": [{"role": "assistant", "content": "answer B0"}], "source": "shp/askscience_train"},
        {"id": "A1:shp_1", "prompt": [{"role": "user", "content": "Question 1?"}],
         "chosen": [{"role": "assistant", "content": "answer B1"}],
         "rejected": [{"role": "assistant", "content": "answer A1"}], "source": "shp/askscience_train"},
    ]
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["read"]["dropped"] == {"SHP 'labels' must be 0 or 1 (got 2)": 1}
    assert steps["ratio"]["dropped"] == {"score ratio under 2": 1}
    kept = pairs(PairsConfig(inputs=[str(source)], output=tmp_path / "all.jsonl", shp_min_ratio=1.0))
    assert kept.records_out == 3


def test_generic_pairs_identical_empty_dedup_and_margin(tmp_path):
    source = write_jsonl(tmp_path / "generic.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},  # same pair again
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"},
        {"prompt": "Hi", "chosen": "  ", "rejected": "Hello"},
    ])
    out = tmp_path / "pairs.jsonl"
    report = pairs(PairsConfig(inputs=[str(source)], output=out)).to_dict()
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "generic_0", "prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "source": "generic", "margin": 1.5}]
    steps = {s["step"]: s["dropped"] for s in report["steps"]}
    assert steps["empty"] == {"empty answer": 1} and steps["identical"] == {"chosen == rejected": 1}
    assert steps["dedup"] == {"same prompt and answers": 1}
    # the pairwise output reads back as the same pairs
    assert read_pairs([str(out)], Counter()) == [json.loads(out.read_text())]


def test_hh_rlhf_real_data_golden(tmp_path):
    out = tmp_path / "hh.jsonl"
    report = pairs(PairsConfig(inputs=[str(HH)], output=out)).to_dict()
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["read"]["in"] == 2312 and steps["read"]["dropped"] == {}
    assert steps["empty"]["dropped"] == {"empty answer": 4}
    assert report["records_out"] == 2308
    got = [json.loads(line) for line in out.read_text().splitlines()]
    with gzip.open(HH, "rt") as f:
        first = json.loads(f.readline())
    assert got[0]["id"] == "harmless-base-test.jsonl_0" and got[0]["source"] == "hh-rlhf"
    assert [m["role"] for m in got[0]["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert got[0]["prompt"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first["chosen"].endswith(got[0]["chosen"][0]["content"])
    assert first["rejected"].endswith(got[0]["rejected"][0]["content"])
    for pair in got:  # every pair: a prompt ending with the user, then two different answers
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        assert pair["chosen"] != pair["rejected"]


def test_hh_pair_without_a_shared_prompt_is_an_error_naming_it(tmp_path):
    source = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: one\n\nAssistant: a", "rejected": "\n\nHuman: two\n\nAssistant: b"}])
    with pytest.raises(VicunaError, match=r"hh.jsonl record 2 \(line 2\): chosen and rejected share no prompt"):
        pairs(PairsConfig(inputs=[str(source)], output=tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()
