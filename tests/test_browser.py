"""The Dagster and MLflow UIs as a newcomer meets them, driven in a real browser (Playwright + Debian's Chromium).

The README's "Dagster and MLflow" commands run verbatim and in the README's order (the MLflow UI first, before the
state exists), in a fresh folder, on the shipped small config (the packaged MiniLM and tweets); the only change is
the two port numbers, replaced by free ones. Everything the user does then goes through the UI: "Materialize all"
on the graph, the `forget` job from its Launchpad, "Materialize all" again to retrain. What the user must see: every
card green after the first run; after the forget, a failed ERROR check on each stage asset listing exactly the stale
(shard, sequence) partitions; after retraining, passing checks and MLflow's champion on a new version that honours
the deletion. GraphQL is used only to wait for runs (with explicit timeouts).

Screenshots go to test-artifacts/browser/ at the repo root and to pytest's tmp_path; the test prints
both. Chromium comes from the system (`apt-get install -y chromium`), never from `playwright install`;
where it is missing the test is skipped with that reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.servers import free_port, wait_http

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_MS = 60_000  # Playwright's default for actions and expectations
RUN_S = 300  # a single light run (forget, the sensor's follow-ups)
BACKFILL_S = 1200  # "Materialize all": ingest, slices, two stages and the ensemble (MiniLM, small config) on 2 busy cores


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

    def wait_backfill(self, backfill_id: str, timeout: float = BACKFILL_S) -> list[dict]:
        """Until the backfill completes; its runs (id, status), for the record."""
        q = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } } }"

        def probe():
            status = self.gql(q, id=backfill_id)["partitionBackfillOrError"].get("status")
            if status in ("FAILED", "CANCELED", "CANCELING", "COMPLETED_FAILED", "FAILING"):
                pytest.fail(f"backfill {backfill_id} ended {status}: {self.url}/runs/b/{backfill_id}\n{_tail(self.log)}")
            return status in ("COMPLETED_SUCCESS", "COMPLETED"), status

        self._until(probe, timeout, f"backfill {backfill_id} ('Materialize all') to complete", poll=5)
        runs = ("query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill "
                "{ runs { id status } } } }")
        return self.gql(runs, id=backfill_id)["partitionBackfillOrError"]["runs"]

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


# ---------------------------------------------------------------- the README's commands

def readme_block() -> str:
    """The first bash block of the README's "Dagster and MLflow" section, as written."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Dagster and MLflow"):]
    return section[section.index("```bash\n") + len("```bash\n"):section.index("\n```", section.index("```bash"))]


def fresh_folder(tmp_path: Path) -> Path:
    """A folder that looks like the repository to the README's commands (its .venv, pipelines/, workspace.yaml) and
    holds nothing else: no earlier state, no Dagster home."""
    here = tmp_path / "checkout"
    here.mkdir()
    (here / ".venv").symlink_to(Path(sys.executable).parent.parent)
    for name in ("pipelines", "workspace.yaml"):
        (here / name).symlink_to(REPO / name)
    return here


@pytest.mark.timeout(2400)
def test_the_readme_dagster_section_verbatim_in_a_browser(chromium, tmp_path, capsys):
    from playwright.sync_api import expect, sync_playwright

    from pipelines.partitions import S3TPartitions, slice_key
    from s3t_ops.config import S3TConfig
    from s3t_ops.engine import S3T
    from s3t_ops.sequences import select_sequences

    block = readme_block()
    assert "-p 5000" in block and "-p 3000" in block, block  # the README and this test must stay in step
    mlflow_port, dagster_port = free_port(), free_port()
    script = block.replace("-p 5000", f"-p {mlflow_port}").replace("-p 3000", f"-p {dagster_port}")
    here = fresh_folder(tmp_path)
    state = here / "s3t_ui_state"
    small = json.loads((REPO / "pipelines" / "examples" / "small.json").read_text())
    cfg = S3TConfig.from_dict({**small, "state_dir": str(state)}, saved=False)
    L, shards = cfg.slices, cfg.shards
    parts = S3TPartitions(shards, select_sequences(cfg.selection, cfg.slices, cfg.budget, cfg.deletion_prior))
    n_slice_parts, n_stage_parts = shards * L, shards * len(parts.sequences)

    shots_tmp = tmp_path / "browser"
    shots_tmp.mkdir()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # screenshots of an earlier run would mislead
        old.unlink()
    shots: list[str] = []
    timings: dict = {}  # what the user waited for, written beside the screenshots (timings.json)
    D, M = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
    graph = (D + "/asset-groups~" + urllib.parse.quote('code_location:"s3t"') + "/?expanded="
             + urllib.parse.quote(",".join(f"global@global:{g}" for g in ("data", "stages", "serving"))))  # memorization stays collapsed: the cards keep their full size
    log = tmp_path / "servers.log"
    dagster = Dagster(dagster_port, log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3T_", "MLFLOW_", "DAGSTER_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = open(log, "w")
    # the README's block, as a user pastes it: both servers start in the background of one shell (its process group)
    shell = subprocess.Popen(["bash", "-c", script], cwd=here, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_http(f"{M}/health", 180, None)
        wait_http(f"{D}/server_info", 300, None)
        assert (state / "mlflow.db").is_file() and not (state / "config.json").exists()  # MLflow first, no state yet

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=UI_MS)
            try:
                page = browser.new_page(viewport={"width": 1920, "height": 1080})
                page.set_default_timeout(UI_MS)
                expect.set_options(timeout=UI_MS)  # expectations too (their own default is 5 s: MLflow's runs table
                # took longer to render on a loaded machine)
                page.set_default_navigation_timeout(120_000)
                page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                         lambda: page.get_by_role("button", name="Skip").click())
                page.add_locator_handler(page.get_by_text("Flexible, governed deployments with the new Model Registry UI"),
                                         lambda: page.keyboard.press("Escape"))
                page.add_locator_handler(page.get_by_role("button", name="Got it"),  # MLflow's first-visit tips
                                         lambda: page.get_by_role("button", name="Got it").click())

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

                def materialize_all(name: str) -> None:
                    open_graph()
                    page.get_by_role("button", name=re.compile(r"Materialize all")).click()  # its name starts with its icon's label
                    dialog = page.get_by_role("dialog")
                    expect(dialog).to_contain_text("materialize 5 assets")  # the S3T assets, never the memorization ones
                    expect(dialog).not_to_contain_text("Error loading")
                    dialog.get_by_role("button", name="Launch backfill").click()
                    t0 = time.time()
                    try:
                        toast = page.get_by_text(re.compile(r"Created backfill \w+")).first
                        backfill = re.search(r"Created backfill (\w+)", toast.inner_text(timeout=30_000)).group(1)
                    except Exception:  # the toast is transient; the newest backfill is the one just launched
                        backfill = dagster.latest_backfill()
                    runs = dagster.wait_backfill(backfill)
                    timings[name] = {"wall_seconds": round(time.time() - t0, 1), "runs": len(runs),
                                     "failed_runs": sum(r["status"] != "SUCCESS" for r in runs)}
                    page.goto(f"{D}/runs/b/{backfill}")
                    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()

                def all_green(name: str) -> None:
                    deadline = time.time() + 240  # the stage checks are evaluated by the automation sensor (every 15 s)
                    while True:
                        open_graph()
                        labels = [checks_icon(f"stage_{k}").get_attribute("aria-label") for k in range(1, L + 1)]
                        texts = [card(f"stage_{k}").inner_text() for k in range(1, L + 1)]
                        if all(x == "done" for x in labels) and all("1 / 1 Passed" in t for t in texts):
                            break
                        if time.time() > deadline:
                            break  # the expectations below fail with what the page shows
                        time.sleep(10)
                    for a in ("examples", "s3t_ensemble"):
                        expect(card(a)).to_contain_text("Materialized")
                    for a, n in (("slice_data", n_slice_parts), *((f"stage_{k}", n_stage_parts) for k in range(1, L + 1))):
                        expect(card(a)).to_contain_text("100% filled")
                        expect(card(a)).to_contain_text(f"{n} partitions")
                    for a in ("slice_data", *(f"stage_{k}" for k in range(1, L + 1)), "s3t_ensemble"):
                        expect(card(a)).to_contain_text("1 / 1 Passed")
                        expect(checks_icon(a)).to_have_attribute("aria-label", "done")
                    shot(name)

                try:
                    # -- 1. the first run: "Materialize all" on a fresh folder (the MLflow UI already made $S3T_STATE)
                    open_graph()
                    shot("01-asset-graph-before-the-first-run")
                    materialize_all("first_materialize_all")
                    all_green("02-asset-graph-after-materialize-all")

                    # -- 2. forget one training example from the forget job's Launchpad
                    train = S3T.open(state, progress=False, repair=False).examples("train")
                    victim = train.sort_values("id").iloc[0]
                    v_id, v_shard, v_slice = victim["id"], int(victim["shard"]), int(victim["slice"])
                    version_before = _champion_version(state)
                    page.goto(f"{D}/locations/s3t/jobs/forget/playground")
                    editor = page
                    editor.locator(".CodeMirror").first.click()
                    page.keyboard.press("Control+a")
                    page.keyboard.insert_text(f'ops:\n  forget_examples:\n    config:\n      ids: ["{v_id}"]\n')
                    expect(page.get_by_text("No errors", exact=True)).to_be_visible()
                    page.get_by_role("button", name="Launch Run").click()
                    t0 = time.time()
                    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=UI_MS)
                    while _alias_version(state) in (version_before, None) and time.time() - t0 < RUN_S:
                        time.sleep(0.1)
                    timings["forget_launch_to_champion_seconds"] = round(time.time() - t0, 1)
                    forget_run = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
                    dagster.wait_run(forget_run)
                    expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()
                    shot("03-forget-run-succeeded")
                    assert _champion_version(state) > version_before  # moved in the forget run itself
                    dagster.wait_follow_ups(forget_run)  # the deletion sensor's serve run re-evaluates the stage checks

                    # -- 3. what the deletion staled, where the user looks: red stage cards, the partitions listed
                    stale = {k: sorted(str(S3TPartitions.stage_partition(v_shard, int(q[1:])))
                                       for q in parts.slice_to_seqs(k)[slice_key(v_slice)]) for k in range(1, L + 1)}
                    open_graph()
                    for k in range(1, L + 1):
                        expect(card(f"stage_{k}")).to_contain_text("0 / 1 Passed")
                        expect(checks_icon(f"stage_{k}")).to_have_attribute("aria-label", "close")  # the red cross
                    expect(card("s3t_ensemble")).to_contain_text("1 / 1 Passed")
                    shot("04-asset-graph-after-forget-stale-stages-red")
                    for k in range(1, L + 1):
                        page.goto(f"{D}/assets/stage_{k}?view=checks")
                        expect(page.get_by_text(f"{len(stale[k])} partition(s) await retraining: {', '.join(stale[k])}",
                                                exact=True)).to_be_visible()
                        shot(f"05-stage_{k}-check-lists-the-stale-partitions")

                    # -- 4. retrain: "Materialize all" again; only the stale stages train; checks pass; a new champion
                    version_forgotten = _champion_version(state)
                    materialize_all("retraining_materialize_all")
                    all_green("06-asset-graph-after-retraining")
                    engine = S3T.open(state, progress=False, repair=False)
                    assert engine.missing_stages() == [] and engine.ledger.deletions()["retrained_at"].notna().all()
                    page.goto(f"{D}/assets/s3t_ensemble")
                    expect(page.get_by_text("served", exact=True).first).to_be_visible()
                    shot("07-ensemble-metadata-served-depths")

                    # -- 5. MLflow: the runs table (not the GenAI overview), the champion on the newest version
                    link = re.search(r"http://127\.0\.0\.1:5000(/#/experiments/\S+)", (REPO / "README.md").read_text()).group(1)
                    page.goto(M + link)  # the README's link to the s3t experiment
                    expect(page.get_by_text(re.compile(r"stage1-s0-p")).first).to_be_visible()
                    shot("08-mlflow-stage-runs")
                    page.goto(M + "/#/models/s3t-ensemble?workflowType=machine_learning")
                    versions = page.get_by_role("row").filter(has=page.get_by_role("link", name=re.compile(r"^Version \d+$")))
                    expect(versions.first).to_be_visible()
                    listed = [int(re.search(r"Version (\d+)", t).group(1)) for t in versions.all_inner_texts()]
                    latest = _champion_version(state)
                    assert latest > version_forgotten and listed[0] == latest, (listed, latest)
                    expect(versions.first).to_contain_text("champion")
                    shot("09-mlflow-champion-on-the-retrained-version")
                except BaseException:
                    try:
                        shot("FAILED-last-page")
                    except Exception:
                        pass
                    raise
            finally:
                browser.close()
    finally:
        (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        os.killpg(shell.pid, signal.SIGTERM)  # the README's servers: the shell's process group
        try:
            shell.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _stop_group(shell.pid)
        out.close()
        with capsys.disabled():
            print(f"\nbrowser screenshots ({len(shots)}): {ARTIFACTS}/ and {shots_tmp}/: {', '.join(shots)}")


def _alias_version(state: Path) -> int | None:
    """The champion's version straight from the MLflow store's table (a cheap poll; 0 when there is none yet, None
    when the store is busy)."""
    import sqlite3

    con = sqlite3.connect(f"file:{state / 'mlflow.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = con.execute("SELECT version FROM registered_model_aliases WHERE alias = 'champion'").fetchone()
    except sqlite3.OperationalError:  # locked
        return None
    finally:
        con.close()
    return int(row[0]) if row else 0


def _champion_version(state: Path) -> int:
    from s3t_ops.engine import S3T

    champ = S3T.open(state, progress=False, repair=False).publisher.tracker.champion()
    return int(champ["version"]) if champ else 0


def _stop_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL after 30 s, to every process of the group (servers stopped by pid, with a timeout)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
