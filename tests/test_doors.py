"""One lifecycle, two doors: the CLI and the Dagster jobs leave the same ledger, files and registry.

The same train -> forget -> retrain runs once through `s3t` and once through the Dagster assets and the
`forget` job (in-process), each on its own state folder with its own MLflow store in it. Checkpoints are
content-addressed within a state's keyspace (slice versions and tombstones are keyed with the state's
secret), so the two doors must serve the same choices from byte-identical files at every (shard, sequence,
stage), and each registry's champion must honour its own tombstone of the deleted example. The deletions
tables must agree too: honoured, erased and retrained, whichever door retrained.
"""
from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from pipelines.definitions import build_definitions
from pipelines.partitions import S3TPartitions
from pipelines.settings import PipelineSettings
from s3t_ops.cli import main
from s3t_ops.config import S3TConfig
from s3t_ops.engine import S3T
from tests.conftest import toy_frame
from tests.statecheck import byte_scan

pytestmark = pytest.mark.timeout(600)


def _cfg(backbone, state) -> S3TConfig:
    return S3TConfig(shards=2, slices=2, budget=2, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
                     n_train=None, n_val=8, n_test=8, backbone=str(backbone), state_dir=state)


def _cli_args(cfg: S3TConfig) -> list[str]:
    return ["--shards", "2", "--slices", "2", "--budget", "2", "--epochs", "1", "--batch-size", "8", "--lr", "0.005",
            "--max-tokens", "16", "--lora-rank", "4", "--n-train", "0", "--n-val", "8", "--n-test", "8",
            "--backbone", cfg.backbone]


def _snapshot(state) -> dict:
    engine = S3T.open(state, progress=False)
    tracker = engine.publisher.tracker
    champ = tracker.champion()
    versions = tracker.versions()
    plan = engine.served()[1]
    position = {s.key: (s.shard, s.seq, s.stage) for s in engine.stage_specs()}
    dels = engine.ledger.deletions()
    return {
        "engine": engine,
        "plan": plan["plan"],
        "served_files": {position[k]: engine.checkpoints.path(k).read_bytes() for keys in plan["checkpoints"].values() for k in keys},
        "files": {position[k]: engine.checkpoints.path(k).read_bytes() for k in engine.checkpoint_rows() if k in position},
        "deletions": {c: dels[c].notna().tolist() for c in ("honoured_at", "erased_at", "registry_erased_at", "retrained_at")}
                     | {"split": dels["split"].tolist(), "cell": list(zip(dels["shard"].tolist(), dels["slice"].tolist()))},
        "depths": json.loads(champ["tags"]["depths"]),
        "honoured": champ["tags"]["honoured_deletions"].split(","),
        "count": champ["tags"]["honoured_deletions_count"],
        "versions_clean": all(engine.audit(engine.ledger.plan(int(v["tags"]["plan_id"]))) == {} for v in versions),
        "champion_plan": int(champ["plan_id"]),
        "served_plan": engine.served()[0],
    }


@pytest.fixture(scope="module")
def doors(tmp_path_factory, tiny_backbone_dir):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("doors")
    data = root / "toy.csv"
    toy_frame(72).to_csv(data, index=False)

    # door 1: the CLI
    cli_state = root / "cli"
    cfg = _cfg(tiny_backbone_dir, cli_state)
    assert main(["train", "--state", str(cli_state), "--source", str(data), "--quiet", *_cli_args(cfg)]) == 0
    train = S3T.open(cli_state, progress=False).examples("train")
    victim = train[(train["shard"] == 1) & (train["slice"] == 1)]["id"].iloc[0]
    text = train.set_index("id").loc[victim, "text"]
    assert main(["forget", "--state", str(cli_state), victim]) == 0
    after_forget_cli = _snapshot(cli_state)
    assert main(["train", "--state", str(cli_state), "--quiet"]) == 0

    # door 2: Dagster, in-process (assets, the forget job, the same retraining through stage partitions)
    dg_state = root / "dagster"
    defs = build_definitions(PipelineSettings(cfg=_cfg(tiny_backbone_dir, dg_state), retrain_policy="eager"))
    instance = dg.DagsterInstance.ephemeral()
    slice_data = defs.resolve_assets_def("slice_data")
    stages = [defs.resolve_assets_def(f"stage_{k}") for k in (1, 2)]
    ensemble = defs.resolve_assets_def("s3t_ensemble")
    assert dg.materialize([defs.resolve_assets_def("examples")], instance=instance,
                          run_config={"ops": {"examples": {"config": {"source": str(data)}}}}).success
    for key in slice_data.partitions_def.get_partition_keys():
        dg.materialize([slice_data], partition_key=key, instance=instance, selection=[slice_data])
    for key in stages[0].partitions_def.get_partition_keys():
        dg.materialize(stages, partition_key=key, instance=instance)
    assert dg.materialize([ensemble], instance=instance).success
    out = defs.resolve_job_def("forget").execute_in_process(
        run_config={"ops": {"forget_examples": {"config": {"ids": [text]}}}}, instance=instance)  # by exact text
    assert out.success and out.output_for_node("forget_examples")["new"] == [victim]
    after_forget_dg = _snapshot(dg_state)  # the forget run alone moved the champion: no sensor, no other run
    for s, j in out.output_for_node("forget_examples")["dirty"]:
        dg.materialize([slice_data], partition_key=S3TPartitions.slice_partition(s, j), instance=instance, selection=[slice_data])
    for key in stages[0].partitions_def.get_partition_keys():
        dg.materialize(stages, partition_key=key, instance=instance)
    assert dg.materialize([ensemble], instance=instance).success
    return {"cli": _snapshot(cli_state), "dagster": _snapshot(dg_state), "cli_forget": after_forget_cli,
            "dagster_forget": after_forget_dg, "victim": victim, "text": text, "root": root}


@pytest.mark.parametrize("moment", ["after forget", "after retraining"])
def test_both_doors_serve_the_same_plan_from_the_same_checkpoints(doors, moment):
    a, b = (doors["cli_forget"], doors["dagster_forget"]) if moment == "after forget" else (doors["cli"], doors["dagster"])
    assert a["plan"] == b["plan"]  # same choices: shard -> sequence, depth
    assert a["served_files"] == b["served_files"]  # the served checkpoints, byte-identical weights
    assert a["files"].keys() == b["files"].keys() and a["files"] == b["files"]  # every live checkpoint too
    assert a["depths"] == b["depths"] and a["count"] == b["count"] == "1"
    assert a["deletions"] == b["deletions"]  # the same ledger of requests: honoured, erased, retrained by either door


def test_both_doors_stamp_the_deletion_retrained(doors):
    for door in ("cli", "dagster"):
        d = doors[door]["deletions"]
        assert d["honoured_at"] == d["erased_at"] == d["retrained_at"] == [True], (door, d)
    for door in ("cli_forget", "dagster_forget"):
        assert doors[door]["deletions"]["retrained_at"] == [False]


def test_both_registries_honour_the_deletion_and_keep_no_tainted_version(doors):
    for door in ("cli", "dagster", "cli_forget", "dagster_forget"):
        snap = doors[door]
        engine = snap["engine"]
        assert engine.ledger.tombstone(doors["victim"]) in snap["honoured"], door
        assert doors["victim"] not in snap["honoured"]
        assert snap["versions_clean"], door
        assert snap["champion_plan"] == snap["served_plan"]  # the champion serves the ledger's plan
    assert doors["cli_forget"]["depths"] != doors["cli"]["depths"]  # honoured by deactivation, then restored


def test_cli_forget_alone_moves_the_champion_and_erases_everywhere(doors):
    """No Dagster involved: `s3t forget` leaves a champion that predicts and honours the deletion, and the
    example's text is in no file of the state folder (ledger, trunk, checkpoints, MLflow store, artifacts)."""
    from s3t_ops.champion import load_champion

    state = doors["root"] / "cli"
    engine = doors["cli"]["engine"]
    tracker = engine.publisher.tracker
    model = load_champion(tracker.model_name, tracker.uri)
    out = model.predict(pd.DataFrame({"text": ["a lovely day", "an awful day"]}))
    assert len(out) == 2 and {"label", "prob_neg", "prob_neu", "prob_pos"} <= set(out.columns)
    assert byte_scan(state, [doors["text"], doors["victim"]]) == []
    assert byte_scan(doors["root"] / "dagster", [doors["text"], doors["victim"]]) == []
