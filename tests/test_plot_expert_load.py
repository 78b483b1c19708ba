"""scripts/plot_expert_load.py: the data it draws, and its CSV fallback without matplotlib."""
import json
import sys

import numpy as np
import pytest

from lm_scripts import load_script


def stats(per_step, rank_loads):
    """A load_stats() JSON record of one layer (only the keys the script reads)."""
    per_step = np.asarray(per_step)
    return {"tokens_per_expert_per_step": per_step.tolist(),
            "tokens_per_expert": per_step.sum(axis=0).tolist(), "rank_loads": rank_loads}


TRAIN_RECORDS = [  # train.py: steps 1 (window 1) and 3 (window 2); 4 experts on 2 ranks
    {"step": 1, "layers": [stats([[1, 2, 3, 4]], [3, 7])]},
    {"step": 3, "layers": [stats([[0, 1, 0, 1], [5, 0, 0, 0]], [6, 1])]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_series_joins_the_windows_end_to_end():
    steps, tokens, ranks = load_script("plot_expert_load").load_series(TRAIN_RECORDS, 0)
    assert steps.tolist() == [1, 2, 3]
    assert tokens.tolist() == [[1, 2, 3, 4], [0, 1, 0, 1], [5, 0, 0, 0]]
    assert ranks.tolist() == [9, 8]


def test_generate_file_without_steps(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"layers": [stats([[1, 1], [2, 0]], [2, 2])]}))
    script = load_script("plot_expert_load")
    steps, tokens, _ = script.load_series(script.read_records(str(path)), 0)
    assert steps.tolist() == [1, 2] and tokens.tolist() == [[1, 1], [2, 0]]


def test_without_matplotlib_writes_csv_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    source = tmp_path / "expert_load.jsonl"
    write_jsonl(source, TRAIN_RECORDS)
    assert load_script("plot_expert_load").main([str(source), "--out",
                                                 str(tmp_path / "load.png")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "load.csv").read_text().splitlines() == [
        "step,expert_0,expert_1,expert_2,expert_3", "1,1,2,3,4", "2,0,1,0,1", "3,5,0,0,0"]
    assert (tmp_path / "load_ranks.csv").read_text().splitlines() == [
        "rank,tokens", "0,9", "1,8"]
    assert not (tmp_path / "load.png").exists()


def test_bad_layer_is_named(tmp_path):
    source = tmp_path / "expert_load.jsonl"
    write_jsonl(source, TRAIN_RECORDS)
    with pytest.raises(SystemExit, match=r"--layer 1 is not allowed: record 0 has 1 MoE layers"):
        load_script("plot_expert_load").main([str(source), "--out", str(tmp_path / "x.png"),
                                              "--layer", "1"])
