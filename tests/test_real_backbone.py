"""Integration on the packaged all-MiniLM-L6-v2 and the packaged tweets (slow-ish: ~1 min on 2 cores)."""
from __future__ import annotations

import json

import pytest
import torch

from s3t_ops.backbone import Backbone, packaged_model_dir
from s3t_ops.cli import main
from s3t_ops.config import S3TConfig

pytestmark = pytest.mark.slow


def test_packaged_minilm_trunk_matches_hf_and_a_stage_trains(tmp_path):
    from transformers import AutoModel

    cfg = S3TConfig(slices=3, max_tokens=24, epochs=2, batch_size=16, state_dir=tmp_path)
    bb = Backbone(cfg)
    assert bb.layout.n_blocks == 6 and bb.hidden_size == 384 and bb.layout.start_blocks() == [0, 2, 4]
    texts = ["I love my new phone", "this update is terrible", "the store opens at nine"]
    ids, mask = bb.tokenize(texts)
    ours = bb.trunk_states(ids, mask, bb.layout.start_blocks())
    ref = AutoModel.from_pretrained(str(packaged_model_dir()), attn_implementation="eager")
    with torch.no_grad():
        hs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for b in bb.layout.start_blocks():
        assert torch.allclose(ours[b], hs[b], atol=1e-5)


def test_demo_on_real_data_runs_end_to_end(tmp_path, capsys):
    state = tmp_path / "state"
    rc = main(["demo", "--state", str(state), "--quiet", "--shards", "2", "--slices", "2", "--budget", "2",
               "--n-train", "120", "--n-val", "40", "--n-test", "60", "--epochs", "1", "--deletions", "2", "--max-tokens", "24"])
    assert rc == 0
    summary = json.loads((state / "demo" / "summary.json").read_text())
    assert (state / "demo" / "deletions.png").stat().st_size > 10_000
    assert summary["audit_clean"] and summary["retrained"]["audit_clean"]
    assert [r["grad_example_steps"] for r in summary["deletions"]] == [0, 0, 0]
    assert summary["initial"]["stages_trained"] == 2 * 2 * 2
    assert summary["retrained"]["depths"] == {"0": 2, "1": 2}
    assert 0.0 <= summary["initial"]["test_accuracy"] <= 1.0
    # the demo ends at the registry: the champion, loaded as a server would, honours both deletions
    assert summary["champion"]["honours_all_deletions"] and summary["champion"]["predictions_equal_engine"]
    out = capsys.readouterr().out
    assert "honoured in" in out and "exactness audit: no served checkpoint saw a deleted example" in out

    # the other commands on the same state
    assert main(["status", "--state", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["deletions"] == {"total": 2, "honoured": 2, "erased": 2, "retrained": 2}
    assert status["stages"]["awaiting_retraining"] == 0
    assert main(["predict", "--state", str(state), "what a lovely day"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(pred["probabilities"]) == {"negative", "neutral", "positive"}
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-3
