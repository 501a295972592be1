"""`s3t serve`: MLflow's scoring protocol answered like the engine, bad input refused with one line, the token, a
linearizable plan switch (no request that starts after a forget returned is answered by an older plan, whichever
door the forget came through), a graceful stop and a restart after SIGKILL. Real servers on 127.0.0.1 (random
ports), stopped by pid with timeouts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from s3t_ops.engine import S3T
from tests.servers import free_port, stop, wait_http
from tests.statecheck import ROOT, cli_env, hash_tree, run_cli, tiny_world

pytestmark = pytest.mark.timeout(600)
CODE = "import sys; from s3t_ops.cli import main; sys.exit(main(sys.argv[1:]))"


class Server:
    def __init__(self, state: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, "-c", CODE, "serve", "--state", str(state), "--port", str(self.port), *extra],
                                     env=cli_env(), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/ping", 180, self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()

    def post(self, path: str, body, content_type: str = "application/json", headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read().decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("serve")
    cfg, data = tiny_world(root, tiny_backbone_dir, 90, state="template")
    engine = S3T.create(cfg, data, progress=False)
    engine.fit()
    return root, cfg


@pytest.fixture
def state(world, tmp_path):
    import shutil

    dst = tmp_path / "s"
    shutil.copytree(world[0] / "template", dst)
    return dst


TEXTS = ["a lovely happy day", "an awful sad day", "fine plain weather", "great, love it"]


def test_the_scoring_protocol_answers_like_the_engine_in_every_format(state, tmp_path):
    engine = S3T.open(state, progress=False)
    labels, probs = engine.ensemble().predict(TEXTS)
    names = engine.label_names
    expected = [{"label": names[y], **{f"prob_{n}": p[j] for j, n in enumerate(names)}} for y, p in zip(labels.tolist(), probs.tolist())]
    server = Server(state, tmp_path / "serve.log")
    try:
        assert server.get("/ping")[0] == server.get("/health")[0] == 200
        assert server.get("/version")[1] == __import__("s3t_ops").__version__
        bodies = [({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}, "application/json"),
                  ({"dataframe_split": {"columns": ["id", "text"], "data": [[i, t] for i, t in enumerate(TEXTS)]}}, "application/json"),
                  ({"dataframe_records": [{"text": t} for t in TEXTS]}, "application/json"),
                  ({"instances": TEXTS}, "application/json"),
                  ({"instances": [{"text": t} for t in TEXTS]}, "application/json"),
                  ({"inputs": {"text": TEXTS}}, "application/json"),
                  (pd.DataFrame({"text": TEXTS}).to_csv(index=False).encode(), "text/csv")]
        for body, kind in bodies:
            status, out = server.post("/invocations", body, kind)
            assert status == 200 and out["plan_id"] == engine.served()[0], out
            assert [r["label"] for r in out["predictions"]] == [r["label"] for r in expected]
            for got, want in zip(out["predictions"], expected):
                assert got == pytest.approx(want, abs=1e-6)
        # what a client of `mlflow models serve` reads: a DataFrame of the predictions, as the registered pyfunc returns
        from s3t_ops.champion import load_champion

        tracker = engine.publisher.tracker
        pyfunc = load_champion(tracker.model_name, tracker.uri).predict(pd.DataFrame({"text": TEXTS}))
        served = pd.DataFrame(server.post("/invocations", {"dataframe_records": [{"text": t} for t in TEXTS]})[1]["predictions"])
        assert list(served.columns) == list(pyfunc.columns) and (served["label"] == pyfunc["label"]).all()
    finally:
        server.stop()


BAD = [  # (body, content type, headers, path, status, words of the message)
    (b"{not json", "application/json", {}, "/invocations", 400, "not JSON"),
    (b"\xff\xfe\x00", "application/json", {}, "/invocations", 400, "not UTF-8"),
    (b"[1, 2]", "application/json", {}, "/invocations", 400, "must be an object"),
    (b"{}", "application/json", {}, "/invocations", 400, "exactly one of"),
    (json.dumps({"instances": ["a"], "inputs": ["b"]}).encode(), "application/json", {}, "/invocations", 400, "exactly one of"),
    (json.dumps({"dataframe_split": {"columns": ["body"], "data": [["a"]]}}).encode(), "application/json", {}, "/invocations", 400, "no `text` column"),
    (json.dumps({"dataframe_split": {"columns": ["text"]}}).encode(), "application/json", {}, "/invocations", 400, "needs `columns`"),
    (json.dumps({"dataframe_records": [{"body": "a"}]}).encode(), "application/json", {}, "/invocations", 400, "needs a `text` field"),
    (json.dumps({"instances": []}).encode(), "application/json", {}, "/invocations", 400, "no input rows"),
    (json.dumps({"instances": [1, 2]}).encode(), "application/json", {}, "/invocations", 400, "must be a string"),
    (json.dumps({"instances": ["a"] * 40}).encode(), "application/json", {}, "/invocations", 413, "exceed this server's limit of 32"),
    (b"x" * 5000, "application/json", {}, "/invocations", 413, "exceeds this server's limit"),
    (b"body\nhello\n", "text/csv", {}, "/invocations", 400, "`text` column"),
    (b"text=hello", "application/x-www-form-urlencoded", {}, "/invocations", 415, "is not accepted"),
    (json.dumps({"ids": ["x"]}).encode(), "application/json", {}, "/forget", 401, "bearer token is required"),
    (json.dumps({"ids": ["x"]}).encode(), "application/json", {"Authorization": "Bearer wrong"}, "/forget", 403, "wrong token"),
    (b"{oops", "application/json", {"Authorization": "TOKEN"}, "/forget", 400, "must be JSON"),
    (json.dumps({"ids": []}).encode(), "application/json", {"Authorization": "TOKEN"}, "/forget", 400, "non-empty list"),
    (json.dumps({"ids": ["  "]}).encode(), "application/json", {"Authorization": "TOKEN"}, "/forget", 400, "non-empty list"),
    (json.dumps({"ids": ["no-such-id"]}).encode(), "application/json", {"Authorization": "TOKEN"}, "/forget", 400, "unknown example id"),
]


def test_bad_requests_are_refused_with_one_line_and_change_nothing(state, tmp_path):
    token = (state / "server.token").read_text().strip()
    server = Server(state, tmp_path / "serve.log", "--max-rows", "32", "--max-body-bytes", "4096")
    try:
        before = hash_tree(state)
        for body, kind, headers, path, status, words in BAD:
            headers = {k: v.replace("TOKEN", f"Bearer {token}") for k, v in headers.items()}
            got, out = server.post(path, body, kind, headers)
            assert got == status and words in out["message"] and "\n" not in out["message"], (path, body[:40], got, out)
        assert server.post("/invocations", {"instances": TEXTS})[0] == 200  # still healthy
        assert hash_tree(state) == before  # nothing changed
    finally:
        server.stop()


def test_forget_is_off_without_a_token_file(state, tmp_path):
    server = Server(state, tmp_path / "serve.log", "--token-file", str(tmp_path / "none"))
    try:
        status, out = server.post("/forget", {"ids": ["x"]}, headers={"Authorization": "Bearer whatever"})
        assert status == 404 and "off" in out["message"]
    finally:
        server.stop()


def test_no_response_that_starts_after_a_forget_returned_uses_an_older_plan(state, tmp_path):
    """Clients send requests without pause while forgets arrive through the CLI and through /forget; every response
    records when its request started and which plan answered it. Plans are numbered in the order the ledger recorded
    them, so "not older" is "plan id at least the forget's"."""
    engine = S3T.open(state, progress=False)
    token = (state / "server.token").read_text().strip()
    train = engine.examples("train").sort_values("id")
    victims = train["id"].tolist()[:6]
    server = Server(state, tmp_path / "serve.log")
    responses: list[tuple[float, float, int]] = []
    stop_at = threading.Event()

    def client() -> None:
        while not stop_at.is_set():
            t0 = time.monotonic()
            status, out = server.post("/invocations", {"instances": TEXTS[:2]})
            assert status == 200, out
            responses.append((t0, time.monotonic(), out["plan_id"]))

    forgets: list[tuple[float, int, str]] = []  # (when the forget returned, the plan it recorded, door)
    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for i, victim in enumerate(victims):
            time.sleep(0.3)
            if i % 2 == 0:
                status, out = server.post("/forget", {"ids": [victim]}, headers={"Authorization": f"Bearer {token}"})
                assert status == 200, out
                forgets.append((time.monotonic(), out["plan_id"], "/forget"))
            else:
                r = run_cli(["forget", victim, "--state", str(state), "--json"])
                assert r.returncode == 0, r.stderr
                forgets.append((time.monotonic(), json.loads(r.stdout)["plan_id"], "cli"))
        time.sleep(0.5)
        stop_at.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.stop()
    assert len(responses) > 50 and {door for *_, door in forgets} == {"/forget", "cli"}
    late = [(start, plan, fplan, door) for start, _, plan in responses for done, fplan, door in forgets if start > done and plan < fplan]
    assert late == [], late[:5]
    plans = {p for *_, p in responses}
    assert max(plans) == S3T.open(state, progress=False).served()[0] and len(plans) >= 3  # the switches were seen


def test_sigterm_drains_and_a_restart_after_sigkill_serves_the_ledgers_plan(state, tmp_path):
    server = Server(state, tmp_path / "serve.log")
    results: list[int] = []

    def client() -> None:
        results.append(server.post("/invocations", {"instances": TEXTS * 8})[0])

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while json.loads(server.get("/plan")[1])["started"] < 6 and time.time() < deadline:  # all six accepted
        time.sleep(0.01)
    os.killpg(server.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert server.proc.wait(timeout=60) == 0 and results == [200] * 6  # every in-flight request answered
    server.log.close()

    server = Server(state, tmp_path / "serve.log")
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    server.log.close()
    # a forget whose process dies between the ledger's commit and the pointer: the next opening puts it right
    victim = S3T.open(state, progress=False).examples("train")["id"].iloc[0]
    r = run_cli(["forget", victim, "--state", str(state)], S3T_CRASH_AT="before_plan_pointer")
    assert r.returncode == -9
    server = Server(state, tmp_path / "serve.log")
    try:
        latest = S3T.open(state, progress=False, repair=False).served()[0]
        assert server.post("/invocations", {"instances": TEXTS})[1]["plan_id"] == latest
    finally:
        server.stop()


def test_the_readmes_serve_commands_work_as_written(state, tmp_path):
    """The README's `s3t serve` block, pasted into a shell: the server starts, answers the curl with predictions and
    a plan id, and the curl to /forget with the state's token honours the request under a newer plan."""
    import re
    import shutil

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(\.venv/bin/s3t serve .*?)```", readme, re.S).group(1)
    port = free_port()
    engine = S3T.open(state, progress=False)
    victim = engine.examples("train")["id"].iloc[0]
    before = engine.served()[0]
    script = (block.replace("s3t_state", str(state)).replace("5001", str(port))
              .replace("<id or exact text>", victim))
    assert "s3t_state" not in script and script.count(str(port)) >= 4, script  # the README and this test in step
    log = tmp_path / "shell.out"
    with open(log, "w") as sink:
        shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=cli_env(), stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        shell.wait(timeout=300)  # the shell ends after the last curl; the server stays up in its group
    finally:
        os.killpg(shell.pid, signal.SIGTERM)  # the README's server: the shell's process group
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                os.killpg(shell.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(shell.pid, signal.SIGKILL)
    out = log.read_text()
    answers = [json.loads(line) for line in re.findall(r"^\{.*\}$", out.replace("}{", "}\n{"), re.M)]
    assert len(answers) == 2, out
    predictions, forgot = answers
    assert predictions["plan_id"] == before and len(predictions["predictions"]) == 2
    row = predictions["predictions"][0]
    assert "label" in row and set(row) == {"label", *(f"prob_{n}" for n in engine.label_names)}, row
    assert forgot["plan_id"] > before and forgot["new"] == 1
    assert S3T.open(state, progress=False).ledger.is_deleted(victim)
    assert shutil.which("curl")


def test_a_forgets_publishing_waits_for_the_first_answer_on_the_new_plan_or_an_idle_server():
    """Serve first, then publish (server.py): the wait ends when an answer used the new plan, at once when nothing
    is queued or computing, and after the timeout otherwise."""
    from s3t_ops.server import Batcher

    batcher = Batcher(plans=None, backbone=None, num_labels=3)
    try:
        t0 = time.perf_counter()
        assert batcher.wait_served(7, timeout=5)  # idle: nothing to wait for
        assert time.perf_counter() - t0 < 1
        with batcher._progress:
            batcher.busy = True  # computing a batch of an older plan
        assert not batcher.wait_served(7, timeout=0.2)

        def answer_on(plan_id: int) -> None:
            time.sleep(0.2)
            with batcher._progress:
                batcher.served_plan = plan_id
                batcher._progress.notify_all()

        threading.Thread(target=answer_on, args=(6,)).start()
        assert not batcher.wait_served(7, timeout=0.6)  # an answer on an older plan does not end the wait
        threading.Thread(target=answer_on, args=(7,)).start()
        assert batcher.wait_served(7, timeout=5)
    finally:
        with batcher._progress:
            batcher.busy = False
        batcher.stop()


def test_a_retraining_that_lands_while_serving_is_served_with_its_new_checkpoints(state, tmp_path):
    """After a forget, `s3t train` (another process) retrains the stale stages and records a new plan; the running
    server answers the next request with that plan, loading the retrained checkpoints it never held, and its answers
    equal the engine's at that plan."""
    engine = S3T.open(state, progress=False)
    victim = engine.examples("train").sort_values("id")["id"].iloc[0]
    server = Server(state, tmp_path / "serve.log")
    try:
        held = json.loads(server.get("/plan")[1])["checkpoints_in_memory"]
        token = (state / "server.token").read_text().strip()
        status, out = server.post("/forget", {"ids": [victim]}, headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and out["new"] == 1
        r = run_cli(["train", "--state", str(state), "--quiet"])
        assert r.returncode == 0, r.stderr
        engine = S3T.open(state, progress=False)
        plan_id = engine.served()[0]
        assert plan_id > out["plan_id"] and not engine.missing_stages()
        labels, probs = engine.ensemble().predict(TEXTS)
        status, answer = server.post("/invocations", {"instances": TEXTS})
        assert status == 200 and answer["plan_id"] == plan_id
        names = engine.label_names
        assert [row["label"] for row in answer["predictions"]] == [names[y] for y in labels.tolist()]
        for row, p in zip(answer["predictions"], probs.tolist()):
            assert [row[f"prob_{n}"] for n in names] == pytest.approx(p, abs=1e-6)
        assert json.loads(server.get("/plan")[1])["checkpoints_in_memory"] > held  # the retrained ones, loaded on demand
    finally:
        server.stop()
