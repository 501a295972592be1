"""The Dagster wiring in-process: definitions load, partitions, and deletion staleness == the planner's prediction."""
from __future__ import annotations

import datetime
import random

import dagster as dg
import pytest

from pipelines.definitions import build_definitions
from pipelines.partitions import S3TPartitions
from pipelines.settings import PipelineSettings, load_settings
from tests.oracles import stages_to_retrain
from s3t_ops.sequences import cyclic, permutation_tree, select_sequences
from tests.conftest import toy_frame


def test_default_definitions_load():
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    executable = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_executable}
    L = load_settings().cfg.slices
    # "Materialize all" (any page) covers the executable assets only: S3T's; the memorization models run only when asked
    assert executable == {"examples", "slice_data", "s3t_ensemble", *(f"stage_{k}" for k in range(1, L + 1))}
    assert keys - executable == {"memorization_scores", "rum_unlearned", "unlearning_report"}
    for key in ("memorization_scores", "rum_unlearned", "unlearning_report"):
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == "memorization" and node.automation_condition is None  # never auto-materialized
    for job in ("forget", "find_examples", "serve", "refresh_slices", "memorization"):
        assert defs.resolve_job_def(job) is not None
    assert {s.name for s in defs.sensors} == {"deletion_sensor", "s3t_automation"}
    assert defs.resolve_schedule_def("retrain_stale_stages").default_status == dg.DefaultScheduleStatus.RUNNING
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"slice_data_holds_no_deleted_id", "exactness_audit", *(f"stage_{k}_is_current" for k in range(1, L + 1))}
    for k in range(1, L + 1):  # a backfill trains every partition of a stage in one step
        assert graph_backfill(defs, f"stage_{k}") == dg.BackfillPolicy.single_run()


def graph_backfill(defs, key: str):
    return defs.resolve_assets_def(key).backfill_policy


def test_eager_policy_lists_no_schedule(tmp_path):
    eager = build_definitions(load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN": "eager"}))
    assert not list(eager.schedules or [])


def test_partitions_and_mapping_follow_the_sequences():
    perms = permutation_tree(3, 4)
    parts = S3TPartitions(2, perms)
    assert len(parts.slice_def.get_partition_keys()) == 2 * 3
    assert len(parts.stage_def.get_partition_keys()) == 2 * 4
    for k in (1, 2, 3):
        m = parts.slice_to_seqs(k)
        for j in range(3):
            assert m[f"j{j}"] == [f"q{q}" for q, p in enumerate(perms) if p.index(j) + 1 <= k]
    assert S3TPartitions.parse("q3|s1") == {"seq": 3, "shard": 1} == S3TPartitions.parse(parts.stage_partition(1, 3))
    with pytest.raises(ValueError, match="not an S3T partition key"):
        S3TPartitions.parse("x1|s0")
    assert parts.slice_to_seqs(3) == {f"j{j}": [f"q{q}" for q in range(4)] for j in range(3)}


def test_invalid_policy_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="S3T_RETRAIN"):
        load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN": "weekly"})
    with pytest.raises(ValueError, match="S3T_RETRAIN_CHAINS must be one of all, cheapest, got 'some'"):
        load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN_CHAINS": "some"})
    with pytest.raises(ValueError, match="S3T_RETRAIN_BUDGET must be an integer"):
        load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN_BUDGET": "lots"})
    with pytest.raises(ValueError, match="S3T_RETRAIN_BUDGET must be >= 0"):
        load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN_BUDGET": "-1"})
    got = load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN_CHAINS": "cheapest", "S3T_RETRAIN_BUDGET": "5000"})
    assert (got.retrain_chains, got.retrain_budget) == ("cheapest", 5000)
    assert load_settings({"S3T_STATE": str(tmp_path), "S3T_RETRAIN_BUDGET": ""}).retrain_budget is None


@pytest.fixture(scope="module")
def trained_pipeline(tmp_path_factory, tiny_backbone_dir):
    """Full in-process materialization of a tiny m=2, L=3, B=3 pipeline (eager policy)."""
    from s3t_ops.config import S3TConfig

    root = tmp_path_factory.mktemp("pipe")
    data = root / "toy.csv"
    toy_frame(120).to_csv(data, index=False)
    cfg = S3TConfig(shards=2, slices=3, budget=3, epochs=1, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4,
                    lora_alpha=8, n_train=None, n_val=12, n_test=12, backbone=str(tiny_backbone_dir), state_dir=root / "state")
    settings = PipelineSettings(cfg=cfg, retrain_policy="eager", tracking_uri=f"sqlite:///{root}/mlflow.db")
    defs = build_definitions(settings)
    instance_cm = dg.instance_for_test()  # a persistent temporary instance: schedules and sensors can read it
    instance = instance_cm.__enter__()
    graph = defs.resolve_asset_graph()
    examples = defs.resolve_assets_def("examples")
    slice_data = defs.resolve_assets_def("slice_data")
    stages = [defs.resolve_assets_def(f"stage_{k}") for k in range(1, 4)]
    ensemble = defs.resolve_assets_def("s3t_ensemble")
    dg.materialize([examples], instance=instance,
                   run_config={"ops": {"examples": {"config": {"source": str(data)}}}})
    for key in slice_data.partitions_def.get_partition_keys():
        dg.materialize([slice_data], partition_key=key, instance=instance, selection=[slice_data])
    for key in stages[0].partitions_def.get_partition_keys():
        dg.materialize(stages, partition_key=key, instance=instance)
    result = dg.materialize([ensemble], instance=instance)
    assert result.success
    yield {"defs": defs, "instance": instance, "cfg": cfg, "slice_data": slice_data, "stages": stages, "graph": graph}
    instance_cm.__exit__(None, None, None)


def _requested_stage_partitions(result, L):
    got = set()
    for k in range(1, L + 1):
        for key in result.get_requested_partitions(dg.AssetKey(f"stage_{k}")):
            p = S3TPartitions.parse(key)
            got.add((p["shard"], p["seq"], k))
    return got


def test_deletions_stale_exactly_the_planned_stage_partitions(trained_pipeline):
    from s3t_ops.engine import S3T

    t = trained_pipeline
    defs, instance, cfg = t["defs"], t["instance"], t["cfg"]
    perms = cyclic(3, 3)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert _requested_stage_partitions(first, 3) == set()  # everything fresh after the full materialization
    cursor = first.cursor

    engine = S3T.open(cfg.state_dir, progress=False)
    train = engine.ledger.examples("train")
    rng = random.Random(7)
    by_shard = train.groupby("shard")
    # two random single deletions; then two deletions in one shard (different slices) in one request
    shard0 = by_shard.get_group(0)
    two = [shard0[shard0["slice"] == j]["id"].iloc[0] for j in sorted(shard0["slice"].unique())[:2]]
    rounds = [[rng.choice(train["id"].tolist())], [rng.choice(train["id"].tolist())], two]
    for ids in rounds:
        forget = defs.resolve_job_def("forget")
        out = forget.execute_in_process(run_config={"ops": {"forget_examples": {"config": {"ids": ids}}}},
                                        instance=instance)
        assert out.success
        dirty_cells = out.output_for_node("forget_examples")["dirty"]
        dirty: dict[int, set[int]] = {}
        for s, j in dirty_cells:
            dirty.setdefault(s, set()).add(j)
            dg.materialize([t["slice_data"]], partition_key=S3TPartitions.slice_partition(s, j), instance=instance,
                           selection=[t["slice_data"]])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        expected = set(stages_to_retrain(perms, cfg.shards, dirty))
        assert expected, "a deletion must stale at least one stage"
        assert _requested_stage_partitions(result, 3) == expected
        # retrain what was requested, so the next round starts fresh
        for s, q in sorted({(s, q) for s, q, _ in expected}):
            k0 = min(k for s2, q2, k in expected if (s2, q2) == (s, q))
            dg.materialize(t["stages"][k0 - 1:], partition_key=S3TPartitions.stage_partition(s, q), instance=instance)
        assert S3T.open(cfg.state_dir, progress=False).missing_stages() == []
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor


def test_exactness_audit_passes_and_catches_an_injected_violation(trained_pipeline):
    from s3t_ops.engine import S3T

    t = trained_pipeline
    defs, instance = t["defs"], t["instance"]
    from pipelines.checks import exactness_audit

    ensemble = next(a for a in defs.assets if a.key == dg.AssetKey("s3t_ensemble"))  # unbound: we pass resources
    victim = S3T.open(t["cfg"].state_dir, progress=False).ledger.examples("train")["id"].iloc[-1]
    assert defs.resolve_job_def("forget").execute_in_process(
        run_config={"ops": {"forget_examples": {"config": {"ids": [victim]}}}}, instance=instance).success
    ok = dg.materialize([ensemble, exactness_audit], instance=instance, resources=defs.resources)
    checks = {e.check_name: e.passed for e in ok.get_asset_check_evaluations()}
    assert checks == {"exactness_audit": True}

    engine = S3T.open(t["cfg"].state_dir, progress=False)
    ckpts = engine.ledger.checkpoints(live_only=False)
    deleted = engine.ledger.deleted()
    stale = [k for k in ckpts[ckpts["purged_at"].notna()]["key"] if engine.ledger.lineage(k) & deleted]
    assert stale, "the deletion must have left purged checkpoints in the ledger"
    bad_record = {"plan": {"m": 1, "choices": []}, "checkpoints": {"0": [stale[0]]}}
    engine.ledger.record_plan(bad_record, 1)
    # run the check alone: it audits the latest served plan in the ledger, now the injected one
    result = dg.materialize([ensemble, exactness_audit], instance=instance, resources=defs.resources,
                            selection=dg.AssetSelection.checks_for_assets(ensemble), raise_on_error=False)
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals == {"exactness_audit": False}


def test_deletion_sensor_requests_the_ensemble_then_each_dirty_slice(trained_pipeline):
    from s3t_ops.engine import S3T

    t = trained_pipeline
    defs, instance = t["defs"], t["instance"]
    engine = S3T.open(t["cfg"].state_dir, progress=False)
    if engine.ledger.deletions().empty:
        engine.forget([engine.ledger.examples("train")["id"].iloc[0]])
    dels = engine.ledger.deletions()
    sensor = defs.resolve_sensor_def("deletion_sensor")
    with dg.build_sensor_context(instance=instance, cursor=None, resources=defs.resources,
                                 repository_def=defs.get_repository_def()) as ctx:
        result = sensor.evaluate_tick(ctx)
    reqs = result.run_requests
    assert reqs[0].job_name == "serve"
    forget_runs = {r for r in dels["request"].dropna()}
    assert forget_runs and all(set(r.tags["s3t/forget_run"].split(",")) == forget_runs for r in reqs)  # linked to the forget run
    cells = {(int(r.shard), int(r.slice)) for r in dels.itertuples() if r.split == "train"}
    got = {(p["shard"], p["slice"]) for p in (S3TPartitions.parse(r.partition_key) for r in reqs[1:])}
    assert all(r.job_name == "refresh_slices" for r in reqs[1:]) and got == cells
    assert result.cursor == str(len(dels))
    with dg.build_sensor_context(instance=instance, cursor=result.cursor, resources=defs.resources,
                                 repository_def=defs.get_repository_def()) as ctx:
        assert not sensor.evaluate_tick(ctx).run_requests  # nothing new: nothing requested


def test_nightly_schedule_requests_each_stale_sequence_from_its_first_stale_stage(trained_pipeline):
    from s3t_ops.engine import S3T

    t = trained_pipeline
    instance, cfg = t["instance"], t["cfg"]
    defs = build_definitions(PipelineSettings(cfg=cfg, retrain_policy="nightly"))  # the same state, the nightly policy
    engine = S3T.open(cfg.state_dir, progress=False)
    engine.train()  # start fresh whatever earlier tests left
    train = engine.ledger.examples("train")
    victim = train[train["shard"] == 1]["id"].iloc[0]
    receipt = engine.forget([victim])
    (s, j), = receipt.dirty
    expected = stages_to_retrain(cyclic(3, 3), cfg.shards, {s: {j}})
    first = {}
    for s2, q, k in expected:
        first[(s2, q)] = min(k, first.get((s2, q), k))
    schedule = defs.resolve_schedule_def("retrain_stale_stages")
    tick = datetime.datetime(2026, 11, 24, 2, tzinfo=datetime.timezone.utc)
    with dg.build_schedule_context(instance=instance, resources=defs.resources, scheduled_execution_time=tick,
                                   repository_def=defs.get_repository_def()) as ctx:
        reqs = list(schedule.evaluate_tick(ctx).run_requests)
    got = {}
    for r in reqs:
        p = S3TPartitions.parse(r.partition_key)
        got[(p["shard"], p["seq"])] = min(int(k.path[-1].split("_")[1]) for k in r.asset_selection)
    assert got == first
    # the policy and budget of `s3t train`, set for the nightly tick: per shard only the sequence whose deleted slice
    # sits last (one stage to redo); with a budget of 0 example-steps nothing fits and the tick says so
    cheapest = build_definitions(PipelineSettings(cfg=cfg, retrain_policy="nightly", retrain_chains="cheapest"))
    with dg.build_schedule_context(instance=instance, resources=cheapest.resources, scheduled_execution_time=tick,
                                   repository_def=cheapest.get_repository_def()) as ctx:
        reqs = list(cheapest.resolve_schedule_def("retrain_stale_stages").evaluate_tick(ctx).run_requests)
    last = next(q for q, perm in enumerate(cyclic(3, 3)) if perm[-1] == j)
    assert [(S3TPartitions.parse(r.partition_key)["shard"], S3TPartitions.parse(r.partition_key)["seq"],
             [k.path[-1] for k in r.asset_selection]) for r in reqs] == [(s, last, ["stage_3"])]
    broke = build_definitions(PipelineSettings(cfg=cfg, retrain_policy="nightly", retrain_budget=0))
    with dg.build_schedule_context(instance=instance, resources=broke.resources, scheduled_execution_time=tick,
                                   repository_def=broke.get_repository_def()) as ctx:
        result = broke.resolve_schedule_def("retrain_stale_stages").evaluate_tick(ctx)
    assert not list(result.run_requests or []) and "none within at most 0 example-steps" in result.skip_message
    engine.train()
    with dg.build_schedule_context(instance=instance, resources=defs.resources, scheduled_execution_time=tick,
                                   repository_def=defs.get_repository_def()) as ctx:
        assert not list(schedule.evaluate_tick(ctx).run_requests or [])  # fresh: the tick skips


def test_asset_graph_partitions_and_stage_dependencies():
    from pipelines.definitions import defs

    cfg = load_settings().cfg
    graph = defs.resolve_asset_graph()
    dims = lambda key: {d.name: len(d.partitions_def.get_partition_keys())  # noqa: E731
                        for d in graph.get(dg.AssetKey(key)).partitions_def.partitions_defs}
    assert dims("slice_data") == {"shard": cfg.shards, "slice": cfg.slices}
    n_seq = len(select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior))
    for k in range(1, cfg.slices + 1):
        node = graph.get(dg.AssetKey(f"stage_{k}"))
        assert dims(f"stage_{k}") == {"shard": cfg.shards, "seq": n_seq}
        parents = {p.to_user_string() for p in node.parent_keys}
        assert parents == ({"slice_data"} | ({f"stage_{k - 1}"} if k > 1 else set()))
        assert isinstance(node.partition_mappings[dg.AssetKey("slice_data")], dg.MultiPartitionMapping)
    assert graph.get(dg.AssetKey("s3t_ensemble")).partitions_def is None


def test_find_examples_and_the_stage_checks_show_what_a_forget_staled(trained_pipeline):
    """In the UI's terms: find an id by a word, forget it by its exact text, and the `serve` run (which the
    deletion sensor starts) shows every stage_k_is_current check failing exactly on the partitions the
    planner says are stale, with them listed; the examples asset carries a preview a user can copy ids from."""
    from s3t_ops.engine import S3T

    t = trained_pipeline
    defs, instance, cfg = t["defs"], t["instance"], t["cfg"]
    engine = S3T.open(cfg.state_dir, progress=False)
    engine.retrain()  # start fresh whatever earlier tests left
    found = defs.resolve_job_def("find_examples").execute_in_process(
        run_config={"ops": {"find_examples_op": {"config": {"contains": "awful"}}}}, instance=instance)
    assert found.success and found.output_for_node("find_examples_op") > 0
    table = next(e.event_specific_data.metadata["examples"].value for e in found.all_events if e.event_type_value == "STEP_OUTPUT")
    train = engine.examples("train")
    hits = train[train["text"].str.contains("awful")]
    assert all(f"`{i}`" in table for i in hits["id"].head(5))
    preview = instance.get_latest_materialization_event(dg.AssetKey("examples")).asset_materialization.metadata["preview"].value
    assert preview.startswith("| id | split | shard | slice | text |") and f"`{train['id'].iloc[0]}`" in preview
    victim = hits.iloc[0]
    out = defs.resolve_job_def("forget").execute_in_process(
        run_config={"ops": {"forget_examples": {"config": {"ids": [victim["text"]]}}}}, instance=instance)
    assert out.success and out.output_for_node("forget_examples")["new"] == [victim["id"]]
    (s, j), = [tuple(c) for c in out.output_for_node("forget_examples")["dirty"]]
    expected = stages_to_retrain(cyclic(3, 3), cfg.shards, {s: {j}})
    serve = defs.resolve_job_def("serve").execute_in_process(instance=instance)
    checks = {e.check_name: e for e in serve.get_asset_check_evaluations()}
    assert set(checks) == {f"stage_{k}_is_current" for k in (1, 2, 3)} | {"exactness_audit"}
    assert checks["exactness_audit"].passed
    for k in (1, 2, 3):
        stale = sorted(str(S3TPartitions.stage_partition(s2, q)) for s2, q, k2 in expected if k2 == k)
        ev = checks[f"stage_{k}_is_current"]
        assert ev.passed == (not stale) and ev.metadata["stale_partitions"].data == stale, k
    with pytest.raises(dg.Failure, match="1 unknown example id"):
        defs.resolve_job_def("forget").execute_in_process(
            run_config={"ops": {"forget_examples": {"config": {"ids": ["no such text or id"]}}}}, instance=instance)
    engine.retrain()
    assert all(e.passed for e in defs.resolve_job_def("serve").execute_in_process(instance=instance).get_asset_check_evaluations())
