"""The S3T engine's key proofs on the tiny backbone.

One module-scoped scenario trains once and records what the engine did at every step:
  1. ingest D, build the trunk, train every stage, serve;
  2. forget x (shard 0): honoured by a new plan with no gradient step;
  3. retrain (engine.train()) and compare with a from-scratch run on D \\ {x};
  4. forget y, z (two slices of shard 1) in one request, retrain, compare with scratch on D \\ {x, y, z}.
The tests below assert on those records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch

from s3t_ops.config import ConfigError, S3TConfig
from s3t_ops.engine import S3T, StateError
from s3t_ops.ledger import UnknownExampleError
from s3t_ops.planner import plan_for_deletions
from tests.oracles import stages_to_retrain
from s3t_ops.publish import Publisher
from s3t_ops.trunk import TrunkCache
from tests.conftest import SHARED_SECRET, toy_frame

M, L = 2, 3  # 2 shards x 3 slices, cyclic B = 3: 18 stages, every slice at positions 1, 2 and 3
BASE = dict(shards=M, slices=L, budget=L, epochs=2, batch_size=8, lr=5e-3, max_tokens=16, lora_rank=4, lora_alpha=8,
            n_train=None, n_val=12, n_test=12)


def make_cfg(backbone_dir: Path, state_dir: Path, **changes) -> S3TConfig:
    return S3TConfig(**{**BASE, "backbone": str(backbone_dir), "state_dir": state_dir, **changes})


def create(cfg: S3TConfig, source) -> S3T:
    """A new state with no registry (the ledger is the record; registry tests live in test_registry.py)."""
    return S3T.create(cfg, source, publisher=Publisher(), progress=False, secret=SHARED_SECRET)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def triples(specs) -> dict[tuple[int, int, int], str]:
    return {(s.shard, s.seq, s.stage): s.key for s in specs}


@dataclass
class Snapshot:
    specs: dict[tuple[int, int, int], str]
    present: set[tuple[int, int, int]]  # stages whose checkpoint file exists
    rows: set[str]  # every checkpoint row ever recorded (purged included)
    served: tuple[int, dict] | None


def snap(eng: S3T) -> Snapshot:
    specs = triples(eng.stage_specs())
    return Snapshot(specs, {t for t, k in specs.items() if eng.checkpoints.exists(k)},
                    set(eng.ledger.checkpoints(live_only=False)["key"]), eng.served())


@dataclass
class Step:
    """One forget request and what followed it."""
    ids: list[str]
    cells: dict[str, tuple[int, int]]
    texts: list[str]
    before: Snapshot
    report: object
    after_forget: Snapshot
    audit_after_forget: dict
    accuracy_after_forget: float
    lineage_served: dict[str, set[str]]
    train_report: object = None
    after_train: Snapshot | None = None
    audit_after_train: dict | None = None
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # every current stage, after retraining
    live: pd.DataFrame | None = None  # live examples after retraining
    trunks: dict[str, TrunkCache] = field(default_factory=dict)  # cached features after retraining
    scratch: S3T | None = None
    extra: dict = field(default_factory=dict)


def _pick(eng: S3T, shard: int, slc: int) -> str:
    train = eng.ledger.examples("train")
    return sorted(train[(train["shard"] == shard) & (train["slice"] == slc)]["id"])[0]


def _forget_step(eng: S3T, ids: list[str]) -> Step:
    train = eng.ledger.examples("train").set_index("id")
    cells = {i: (int(train.loc[i, "shard"]), int(train.loc[i, "slice"])) for i in ids}
    texts = [train.loc[i, "text"] for i in ids]
    before = snap(eng)
    report = eng.forget(ids)
    after = snap(eng)
    lineage = {k: eng.ledger.lineage(k) for keys in after.served[1]["checkpoints"].values() for k in keys}
    return Step(ids, cells, texts, before, report, after, eng.audit(), eng.evaluate("test"), lineage)


def _retrain(eng: S3T, step: Step) -> None:
    step.train_report = eng.train()
    eng.serve()
    step.after_train = snap(eng)
    step.audit_after_train = eng.audit()
    step.states = {key: eng.load_checkpoint(key) for key in step.after_train.specs.values()}
    step.live = eng.ledger.examples()
    step.trunks = {rel.rsplit("/", 1)[-1]: TrunkCache.load(eng.storage, rel) for rel in eng.storage.glob("trunk/*.safetensors")}


def _scratch(backbone_dir: Path, root: Path, name: str, raw: pd.DataFrame, gone_texts: list[str]) -> S3T:
    path = root / f"{name}.csv"
    raw[~raw["text"].isin(gone_texts)].to_csv(path, index=False)
    eng = create(make_cfg(backbone_dir, root / name), path)
    eng.build_trunk()
    eng.train()
    return eng


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_backbone_dir, one_torch_thread):
    root = tmp_path_factory.mktemp("engine")
    raw = toy_frame(120)
    raw.to_csv(root / "D.csv", index=False)
    eng = create(make_cfg(tiny_backbone_dir, root / "A"), root / "D.csv")
    counts = eng.examples().groupby("split").size().to_dict()
    eng.build_trunk()
    first = eng.train()
    pid0, plan0 = eng.serve()
    initial = dict(counts=counts, report=first, plan_id=pid0, plan=plan0, snapshot=snap(eng), accuracy=eng.evaluate("test"))

    # 1. one example in shard 0, slice 1 (position 2 in seq 0, 3 in seq 1, 1 in seq 2)
    x = _pick(eng, 0, 1)
    one = _forget_step(eng, [x])
    _retrain(eng, one)
    one.scratch = _scratch(tiny_backbone_dir, root, "B", raw, one.texts)

    # 2. two examples of shard 1 (slices 0 and 2) in one request
    y, z = _pick(eng, 1, 0), _pick(eng, 1, 2)
    two = _forget_step(eng, [y, z])
    two.extra["repeat"] = eng.forget([x])  # idempotent, no new plan
    _retrain(eng, two)
    two.scratch = _scratch(tiny_backbone_dir, root, "C", raw, one.texts + two.texts)
    return dict(engine=eng, root=root, initial=initial, steps=[one, two])


STEPS = [0, 1]


def _dirty(step: Step) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for s, j in step.cells.values():
        out.setdefault(s, set()).add(j)
    return out


# --- initial training -----------------------------------------------------------------------------
def test_initial_training_and_serving(scenario):
    ini = scenario["initial"]
    assert ini["counts"] == {"train": 96, "val": 12, "test": 12}
    assert len(ini["report"].trained) == M * L * L and ini["report"].reused == 0
    lineage = [scenario["engine"].ledger.lineage(k) for k in ini["snapshot"].specs.values()]
    assert ini["report"].grad_example_steps == BASE["epochs"] * sum(map(len, lineage))  # cumulative stages
    assert len(set().union(*lineage)) == 96  # the full-depth stages of both shards cover D
    assert ini["snapshot"].present == set(ini["snapshot"].specs)
    assert [(c.shard, c.depth) for c in ini["plan"].choices] == [(0, L), (1, L)]
    assert 0.0 <= ini["accuracy"] <= 1.0


# --- b. honour without training ------------------------------------------------------------------
@pytest.mark.parametrize("n", STEPS)
def test_forget_is_honoured_without_a_gradient_step(scenario, n):
    step = scenario["steps"][n]
    rep = step.report
    assert set(rep.new) == set(step.ids) and rep.already == ()
    assert set(rep.dirty) == set(step.cells.values())
    assert rep.grad_example_steps == 0
    # no checkpoint was created: the rows are the ones that existed before the request
    assert step.after_forget.rows == step.before.rows
    # a new plan was recorded and is the one served
    assert step.after_forget.served[0] == rep.plan_id > step.before.served[0]
    assert step.after_forget.served[1]["plan"] == rep.plan.to_dict()
    tombs = {scenario["engine"].ledger.tombstone(i) for i in step.ids}
    deleted = scenario["engine"].ledger.deleted()
    assert tombs <= deleted
    # every served checkpoint's lineage (keyed tombstones of its examples) is known and excludes every deleted one
    assert step.lineage_served and all(ids for ids in step.lineage_served.values())
    for key, ids in step.lineage_served.items():
        assert not (ids & tombs), key
    assert step.audit_after_forget == {}
    assert 0.0 <= step.accuracy_after_forget <= 1.0  # the honouring plan can be served as is


@pytest.mark.parametrize("n", STEPS)
def test_served_depths_are_the_longest_valid_prefixes(scenario, n):
    step = scenario["steps"][n]
    eng = scenario["engine"]
    # earlier deletions are retrained by now: only this step's slices limit the prefixes
    expected = plan_for_deletions(eng.sequences, M, _dirty(step))
    assert {c.shard: c.depth for c in step.report.plan.choices} == {c.shard: c.depth for c in expected.choices}
    served = step.after_forget.served[1]["checkpoints"]
    for c in step.report.plan.choices:
        assert len(served[str(c.shard)]) == c.depth
        assert served[str(c.shard)] == [step.after_forget.specs[(c.shard, c.seq, k)] for k in range(1, c.depth + 1)]


@pytest.mark.parametrize("n", STEPS)
def test_missing_stages_are_exactly_the_predicted_ones(scenario, n):
    step = scenario["steps"][n]
    eng = scenario["engine"]
    predicted = set(stages_to_retrain(eng.sequences, M, _dirty(step)))
    missing = set(step.after_forget.specs) - step.after_forget.present
    assert missing == predicted
    if n == 0:  # x in slice 1 of shard 0, at positions 2, 3, 1 of the three rotations
        assert eng.sequences == [(0, 1, 2), (2, 0, 1), (1, 2, 0)]
        assert sorted(missing) == [(0, 0, 2), (0, 0, 3), (0, 1, 3), (0, 2, 1), (0, 2, 2), (0, 2, 3)]
    else:  # slices 0 and 2 of shard 1: only the first stage of (1, 2, 0) survives there
        assert len(missing) == L * L - 1
    # stages of other shards and before the deleted slice's position keep their key (and file)
    for t, key in step.before.specs.items():
        if t in predicted:
            assert step.after_forget.specs[t] != key, t
            assert not scenario["engine"].checkpoints.exists(key), t
        else:
            assert step.after_forget.specs[t] == key, t
            assert t in step.after_forget.present
    assert step.report.purged_checkpoints == len(predicted)


# --- c. audit and erasure ------------------------------------------------------------------------
def test_audit_catches_a_plan_that_serves_a_deleted_example(scenario):
    eng = scenario["engine"]
    stale = scenario["initial"]["snapshot"].served[1]  # trained on D: holds x, y, z
    bad = eng.audit(stale)
    deleted = {eng.ledger.tombstone(i) for i in scenario["steps"][0].ids + scenario["steps"][1].ids}
    assert bad and set().union(*bad.values()) == deleted
    assert eng.audit() == {}


@pytest.mark.parametrize("n", STEPS)
def test_deleted_examples_are_physically_erased(scenario, n):
    step = scenario["steps"][n]
    eng = scenario["engine"]
    trunk_files = eng.storage.glob("trunk/*")
    assert len(trunk_files) == M * L + 2 and all(rel.endswith(".safetensors") for rel in trunk_files)
    cached: set[str] = set()
    for rel in trunk_files:
        cached |= set(TrunkCache.load(eng.storage, rel).ids)
    live = set(eng.ledger.examples()["id"])
    assert cached == live
    assert not (set(step.ids) & cached)
    assert not (set(step.ids) & live)
    for text in step.texts:
        assert not eng.ledger.examples()["text"].eq(text).any()
    # the text and the raw id are gone from every file of the state, the ledger's included (tombstones are keyed)
    for p in eng.root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for needle in step.texts + step.ids:
                assert needle.encode() not in data, (p, needle)


@pytest.mark.parametrize("n", STEPS)
def test_purge_removed_the_stale_checkpoint_files(scenario, n):
    step = scenario["steps"][n]
    eng = scenario["engine"]
    stale = set(step.before.specs.values()) - set(step.after_forget.specs.values())
    assert len(stale) == step.report.purged_checkpoints > 0
    rows = eng.ledger.checkpoints(live_only=False).set_index("key")
    for key in stale:
        assert not eng.checkpoints.exists(key)
        assert pd.notna(rows.loc[key, "purged_at"])
    files = {p.stem for p in (eng.root / "checkpoints").rglob("*.safetensors")}
    assert files == set(eng.ledger.checkpoints()["key"])  # only live checkpoints remain on disk
    assert not list((eng.root / "checkpoints").rglob("*.tmp*"))


def test_repeated_forget_is_idempotent_and_unknown_ids_change_nothing(scenario):
    eng = scenario["engine"]
    rep = scenario["steps"][1].extra["repeat"]
    assert rep.new == () and rep.already == tuple(scenario["steps"][0].ids) and rep.dirty == ()
    assert rep.plan_id == scenario["steps"][1].report.plan_id and rep.purged_checkpoints == 0
    before = snap(eng)
    with pytest.raises(UnknownExampleError, match="nothing was deleted"):
        eng.forget(["no-such-id", scenario["steps"][0].ids[0]])
    assert snap(eng) == before


# --- a. retrain equivalence ----------------------------------------------------------------------
@pytest.mark.parametrize("n", STEPS)
def test_retrain_trains_only_the_missing_stages(scenario, n):
    step = scenario["steps"][n]
    eng = scenario["engine"]
    rep = step.train_report
    predicted = set(stages_to_retrain(eng.sequences, M, _dirty(step)))
    assert {(s.shard, s.seq, s.stage) for s in rep.trained} == predicted
    assert rep.reused == M * L * L - len(predicted)
    assert 0 < rep.grad_example_steps < scenario["initial"]["report"].grad_example_steps
    assert step.after_train.present == set(step.after_train.specs)
    assert step.after_train.specs == step.after_forget.specs  # retraining fills the keys the plan expected
    assert step.audit_after_train == {}
    plan = step.after_train.served[1]["plan"]
    assert [(c["shard"], c["depth"]) for c in plan["choices"]] == [(0, L), (1, L)]
    assert eng.ledger.deletions()["retrained_at"].notna().all()


@pytest.mark.parametrize("n", STEPS)
def test_retrained_stages_equal_training_from_scratch_bitwise(scenario, n):
    step = scenario["steps"][n]
    scratch = step.scratch
    cols = ["id", "text", "label", "split", "shard", "slice"]
    # the scratch state holds the same live data (same ids, splits and cells) ...
    pd.testing.assert_frame_equal(step.live[cols], scratch.ledger.examples()[cols])
    assert not (set(step.ids) & set(step.live["id"]))
    # ... the same frozen features (ours were computed with x and then had its rows erased) ...
    names = [f"train-s{s}-j{j}.safetensors" for s in range(M) for j in range(L)] + ["val.safetensors", "test.safetensors"]
    assert sorted(step.trunks) == sorted(names)
    for name in names:
        a, b = step.trunks[name], TrunkCache.load(scratch.storage, f"trunk/{name}")
        assert a.ids == b.ids and torch.equal(a.mask, b.mask)
        assert (a.input_ids is None and b.input_ids is None) or torch.equal(a.input_ids, b.input_ids)
        assert a.hidden.keys() == b.hidden.keys() and all(torch.equal(a.hidden[k], b.hidden[k]) for k in b.hidden), name
    # ... and every stage of the current specs has the same key and the same tensors, bit for bit
    ours, theirs = step.after_train.specs, triples(scratch.stage_specs())
    assert ours == theirs and len(ours) == M * L * L
    for t, key in ours.items():
        a, b = step.states[key], scratch.load_checkpoint(key)
        assert a.keys() == b.keys() and any(k.startswith("lora.") for k in a) and "head.weight" in a, t
        for name in a:
            assert torch.equal(a[name], b[name]), (t, name, (a[name] - b[name]).abs().max())
    # the retrained stages moved away from the LoRA init (B = 0), so equality is not trivial
    for spec in step.train_report.trained:
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in step.states[spec.key].items())


# --- d. ingest errors ------------------------------------------------------------------------------
def test_create_into_an_existing_state_fails_and_changes_nothing(tiny_config, toy_csv):
    cfg = tiny_config()
    eng = create(cfg, toy_csv)
    n = len(eng.ledger.examples())
    with pytest.raises(StateError, match="already holds"):
        create(cfg, toy_csv)
    assert len(eng.ledger.examples()) == n
    reopened = S3T.open(cfg.state_dir, progress=False, publisher=Publisher())
    assert reopened.cfg == cfg and reopened.label_names == ["neg", "neu", "pos"]


def test_open_without_state_fails(tmp_path):
    with pytest.raises(StateError, match="no S3T state"):
        S3T.open(tmp_path / "nothing")


def test_retrained_checkpoint_files_are_byte_identical_to_scratch(scenario):
    """Canonical files: equal tensors give equal bytes (no metadata in a random order), so the ledger's
    sha256 of a retrained stage equals the from-scratch run's."""
    step = scenario["steps"][1]
    eng, scratch = scenario["engine"], step.scratch
    for key in step.after_train.specs.values():
        assert eng.checkpoints.path(key).read_bytes() == scratch.checkpoints.path(key).read_bytes(), key
        assert eng.checkpoint_rows()[key]["sha256"] == scratch.checkpoint_rows()[key]["sha256"]


def test_empty_slices_are_a_config_error_and_leave_no_state(tiny_config, toy_csv):
    from s3t_ops.partition import assign_all

    from s3t_ops.data import build_dataset, load_source

    cfg = tiny_config(shards=12, slices=4, budget=1)  # 48 cells for 96 training examples: some stay empty

    ds = build_dataset(load_source(toy_csv), cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    ids = ds.split("train")["id"]
    assert len(ids) >= 48 and len(set(assign_all(ids, 12, 4).values())) < 48  # the empty-slice path, not too few
    with pytest.raises(ConfigError, match="would be empty") as exc:
        create(cfg, toy_csv)
    assert exc.value.field == "shards"
    assert not cfg.state_dir.exists() and not list(cfg.state_dir.parent.glob(".*creating*"))
    with pytest.raises(ConfigError) as exc:  # fewer examples than slices
        create(tiny_config(shards=40, slices=3, budget=1), toy_csv)
    assert exc.value.field == "shards"
    # the same folder then takes a valid config
    assert create(tiny_config(), toy_csv).examples("train").shape[0] == 96


@pytest.mark.parametrize("changes", [{}, {"refine_groups": False, "lora_targets": ("query", "value")}, {"frozen_blocks": 2},
                                     {"warm_start_head": False}, {"trunk_dtype": "float32"},
                                     {"stage_model": "full_depth"}])
def test_stage_model_levers_keep_retraining_bitwise_equal_to_scratch(tmp_path, tiny_backbone_dir, changes):
    """Every stage-model lever the ablation tries keeps exactness: retrain after forget == scratch on D minus x."""
    raw = toy_frame(60)
    raw.to_csv(tmp_path / "D.csv", index=False)
    cfg = make_cfg(tiny_backbone_dir, tmp_path / "A", shards=2, slices=2, budget=2, **changes)
    eng = create(cfg, tmp_path / "D.csv")
    eng.fit()
    x = _pick(eng, 0, 0)
    text = eng.examples().set_index("id").loc[x, "text"]
    eng.forget([x])
    assert eng.missing_stages()
    eng.retrain()
    raw[raw["text"] != text].to_csv(tmp_path / "D2.csv", index=False)
    scratch = create(make_cfg(tiny_backbone_dir, tmp_path / "B", shards=2, slices=2, budget=2, **changes), tmp_path / "D2.csv")
    scratch.fit()
    ours, theirs = triples(eng.stage_specs()), triples(scratch.stage_specs())
    assert ours == theirs
    for key in ours.values():
        assert eng.checkpoints.path(key).read_bytes() == scratch.checkpoints.path(key).read_bytes()
    if changes.get("stage_model") == "full_depth":  # a full-depth stage holds every group, stage 1 included
        first = eng.load_checkpoint(ours[(0, 0, 1)])
        assert any(k.startswith("lora.g1.") for k in first) and any(k.startswith("lora.g2.") for k in first)
    elif changes.get("refine_groups", True):  # a refined stage (the default) holds every group above it too
        top = eng.load_checkpoint(ours[(0, 0, 2)])
        assert any(k.startswith("lora.g1.") for k in top) and any(k.startswith("lora.g2.") for k in top)
    assert eng.evaluate("test") == scratch.evaluate("test")
