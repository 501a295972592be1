"""Serving under load: `s3t serve` against `mlflow models serve` on the same champion, side by side in one run.

Setup: a state on the packaged MiniLM (the README's small config unless flags say otherwise), trained and registered.
Phases, each with --clients concurrent clients (persistent HTTP connections, 1-4 test tweets per request):
  mlflow     `mlflow models serve -m models:/<name>@champion` (one worker): requests/s, latency, errors. A loaded
             version is pinned: it cannot follow deletions, so none arrive in this phase.
  s3t        `s3t serve` for --seconds while deletions arrive every --forget-every seconds, alternating between the
             server's own `/forget` and the CLI (`s3t forget`, another process), and a retraining (`s3t train`, another
             process) lands after --retrain-after seconds. Besides requests/s and latency: responses computed with a
             superseded plan after a forget returned (target 0), and forget -> first response on the new plan, from
             the forget request (/forget) and from the honour's commit (the plan pointer's change, both doors).
  s3t_unbatched  the same server with micro-batching off (--max-batch-rows 1): what batching concurrent requests
             through one shared trunk pass is worth.
The server's resident memory (its process) is read at the start and the end of its phase. Writes serving_load.json
and serving_load.png.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import ROOT, apply_threads, base_parser, clean_env, machine, plt, target, write_json

NAME = "serving_load"
CLI = [sys.executable, "-c", "import sys; from s3t_ops.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process and its children (MiB), from /proc."""
    total, seen = 0, 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    seen += 1
        except OSError:
            pass
    return total / 1024 if seen else None


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(Path(f"/proc/{d.name}/stat").read_text().split(")")[1].split()[1]) == pid:
                    out += [int(d.name), *_children(int(d.name))]
            except (OSError, IndexError, ValueError):
                pass
    return out


class Proc:
    """A server process in its own group, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, args: list[str], env: dict, log: Path, url: str, timeout: float = 300):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                conn = http.client.HTTPConnection(url.split("//")[1], timeout=2)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{args[0]} did not start; see {log}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def load(port: int, texts: list[str], clients: int, seconds: float, stop: threading.Event | None = None) -> list[dict]:
    """`clients` threads, each with a persistent connection, sending requests without pause for `seconds`."""
    rows: list[dict] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = random.Random(k)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < end and not (stop and stop.is_set()):
            body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in rng.sample(texts, rng.randint(1, 4))]}})
            t0 = time.monotonic()
            try:
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                out = r.read()
                status = r.status
                plan = json.loads(out).get("plan_id") if status == 200 else None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                status, plan = f"error: {type(exc).__name__}", None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                rows.append({"start": t0, "end": time.monotonic(), "status": status, "plan_id": plan})
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows


def summary(rows: list[dict], seconds: float) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    lat = np.array([r["end"] - r["start"] for r in ok]) * 1000
    return {"requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "requests_per_s": len(ok) / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None, "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def watch_pointer(path: Path, stop: threading.Event, seen: dict[int, float]) -> None:
    """When each plan id first appeared in the plan pointer (stat every millisecond)."""
    last = None
    while not stop.is_set():
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns)
            if stamp != last:
                last = stamp
                pid = json.loads(path.read_text())["plan_id"]
                seen.setdefault(int(pid), time.monotonic())
        except (OSError, ValueError):
            pass
        time.sleep(0.001)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(NAME, __doc__)
    p.add_argument("--config", default=str(ROOT / "pipelines" / "examples" / "small.json"), help="S3T config JSON of the served state")
    p.add_argument("--backbone", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--source", default=None, help="CSV/Parquet with text,label (default: the packaged tweets)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="length of the mlflow and s3t phases")
    p.add_argument("--unbatched-seconds", type=float, default=30.0)
    p.add_argument("--forget-every", type=float, default=4.0, help="seconds between deletions in the s3t phase")
    p.add_argument("--retrain-after", type=float, default=20.0, help="when the retraining starts in the s3t phase")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.unbatched_seconds, args.forget_every, args.retrain_after = 4, 12.0, 6.0, 2.0, 3.0
    if args.clients < 1 or args.seconds <= 0:
        p.error("--clients and --seconds must be positive")
    apply_threads(args)
    out = Path(args.out)
    work = out / f"state-{NAME}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state = work / "state"
    # mlflow models serve starts `uvicorn` by name: the venv's bin folder goes first on PATH
    env = clean_env(OMP_NUM_THREADS=str(args.threads or os.cpu_count()), PYTHONPATH=str(ROOT),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cfg = json.loads(Path(args.config).read_text())
    flags = []
    for k, v in cfg.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    if args.backbone:
        flags += ["--backbone", args.backbone]
    if args.quick:
        flags += ["--n-train", "0", "--n-val", "8", "--n-test", "16", "--max-tokens", "16"]
    subprocess.run([*CLI, "train", "--state", str(state), "--quiet", *flags, *(["--source", args.source] if args.source else [])],
                   env=env, cwd=ROOT, check=True)
    import duckdb

    con = duckdb.connect(str(state / "ledger.duckdb"), read_only=True)
    texts = [r[0] for r in con.execute("SELECT text FROM examples WHERE split='test' ORDER BY id").fetchall()]
    victims = [r[0] for r in con.execute("SELECT id FROM examples WHERE split='train' ORDER BY id").fetchall()]
    con.close()
    random.Random(0).shuffle(victims)
    result = {"benchmark": NAME, "args": vars(args), "machine": machine(), "config": cfg, "phases": {}}

    # --- mlflow models serve on the champion ---
    port = free_port()
    mlflow = Proc([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/s3t-ensemble@champion",
                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                  {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}"}, work / "mlflow.log", f"http://127.0.0.1:{port}")
    try:
        before = rss_mb(mlflow.proc.pid)
        rows = load(port, texts, args.clients, args.seconds)
        result["phases"]["mlflow"] = {**summary(rows, args.seconds), "rss_mb_start": before, "rss_mb_end": rss_mb(mlflow.proc.pid)}
    finally:
        mlflow.stop()

    # --- s3t serve, with deletions through two doors and a retraining ---
    def s3t_phase(name: str, seconds: float, extra: list[str], deletions: bool) -> dict:
        port = free_port()
        server = Proc([*CLI, "serve", "--state", str(state), "--port", str(port), *extra], env, work / f"{name}.log",
                      f"http://127.0.0.1:{port}")
        try:
            start_rss = rss_mb(server.proc.pid)
            stop, seen = threading.Event(), {}
            watcher = threading.Thread(target=watch_pointer, args=(state / "served-plan.json", stop, seen))
            watcher.start()
            forgets, retrain = [], {}
            token = (state / "server.token").read_text().strip()

            def deleter() -> None:
                t_end = time.monotonic() + seconds - 2
                k, t0 = 0, time.monotonic()
                retrained = False
                while time.monotonic() < t_end:
                    time.sleep(args.forget_every)
                    victim = victims.pop()
                    if k % 2 == 0:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                        sent = time.monotonic()
                        conn.request("POST", "/forget", body=json.dumps({"ids": [victim]}),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
                        r = conn.getresponse()
                        out = json.loads(r.read())
                        forgets.append({"door": "/forget", "sent": sent, "returned": time.monotonic(), "plan_id": out.get("plan_id"),
                                        "status": r.status})
                    else:
                        sent = time.monotonic()
                        r = subprocess.run([*CLI, "forget", victim, "--state", str(state), "--json"], env=env, cwd=ROOT,
                                           capture_output=True, text=True)
                        forgets.append({"door": "cli", "sent": sent, "returned": time.monotonic(), "status": r.returncode,
                                        "plan_id": json.loads(r.stdout)["plan_id"] if r.returncode == 0 else None})
                    k += 1
                    if not retrained and time.monotonic() - t0 > args.retrain_after:
                        retrained = True
                        retrain["started"] = time.monotonic()
                        retrain["proc"] = subprocess.Popen([*CLI, "train", "--state", str(state), "--quiet"], env=env, cwd=ROOT,
                                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

            thread = threading.Thread(target=deleter) if deletions else None
            if thread:
                thread.start()
            rows = load(port, texts, args.clients, seconds)
            if thread:
                thread.join()
            if "proc" in retrain:
                retrain["returncode"] = retrain["proc"].wait(timeout=1800)
                retrain["ended"] = time.monotonic()
                retrain.pop("proc")
            stop.set()
            watcher.join()
            phase = {**summary(rows, seconds), "rss_mb_start": start_rss, "rss_mb_end": rss_mb(server.proc.pid),
                     "plans_seen": sorted({r["plan_id"] for r in rows if r["plan_id"] is not None})}
            if deletions:
                late, reaction = 0, []
                for f in forgets:
                    if f["plan_id"] is None:
                        continue
                    late += sum(1 for r in rows if r["status"] == 200 and r["start"] > f["returned"] and r["plan_id"] < f["plan_id"])
                    newer = [r["end"] for r in rows if r["status"] == 200 and r["plan_id"] is not None and r["plan_id"] >= f["plan_id"]
                             and r["end"] >= f["sent"]]
                    first = min(newer) if newer else None
                    committed = seen.get(int(f["plan_id"]))
                    reaction.append({"door": f["door"], "plan_id": f["plan_id"],
                                     "from_request_ms": None if first is None else (first - f["sent"]) * 1000,
                                     "from_commit_ms": None if first is None or committed is None else (first - committed) * 1000,
                                     "forget_returned_ms": (f["returned"] - f["sent"]) * 1000})
                phase.update(superseded_after_forget=late, forgets=reaction, forget_errors=sum(1 for f in forgets if f["status"] not in (200, 0)))
                for door in ("/forget", "cli"):
                    vals = [x for x in reaction if x["door"] == door]
                    for key in ("from_request_ms", "from_commit_ms", "forget_returned_ms"):
                        got = [x[key] for x in vals if x[key] is not None]
                        phase[f"{door.strip('/')}_{key}_p50"] = float(np.median(got)) if got else None
                        phase[f"{door.strip('/')}_{key}_max"] = float(max(got)) if got else None
                if retrain:
                    retrain_plans = [pid for pid, t in seen.items() if t >= retrain["started"] and t <= retrain.get("ended", 1e18)]
                    phase["retraining"] = {"seconds": retrain.get("ended", 0) - retrain["started"], "returncode": retrain.get("returncode"),
                                           "plans_recorded_meanwhile": retrain_plans}
            return phase
        finally:
            server.stop()

    result["phases"]["s3t"] = s3t_phase("s3t", args.seconds, [], True)
    result["phases"]["s3t_unbatched"] = s3t_phase("s3t_unbatched", args.unbatched_seconds, ["--max-batch-rows", "1"], False)
    ph = result["phases"]
    result["targets"] = [
        target("requests/s of s3t serve over mlflow models serve (same champion, same clients)", ph["s3t"]["requests_per_s"] / ph["mlflow"]["requests_per_s"], 1.0),
        target("errors under load (s3t serve)", ph["s3t"]["errors"], 0, higher_is_better=False, unit="requests"),
        target("responses computed with a superseded plan after the forget returned", ph["s3t"]["superseded_after_forget"], 0,
               higher_is_better=False, unit="responses"),
        target("forget -> first response on the new plan through /forget (p50, from the request)", ph["s3t"]["forget_from_request_ms_p50"], 50,
               higher_is_better=False, unit="ms"),
        target("forget -> first response on the new plan through the CLI (p50, from the honour's commit)", ph["s3t"]["cli_from_commit_ms_p50"], 1000,
               higher_is_better=False, unit="ms"),
        target("micro-batching: requests/s batched over unbatched", ph["s3t"]["requests_per_s"] / ph["s3t_unbatched"]["requests_per_s"], 1.0),
    ]
    write_json(out, NAME, result)
    plot(result, out / f"{NAME}.png")
    if not args.quiet:
        for t in result["targets"]:
            print(f"target: {t['target']}: measured {t['measured']} -> {'MET' if t['met'] else 'not met'}")
    shutil.rmtree(work, ignore_errors=True)
    return result


def plot(result: dict, path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4), dpi=110)
    ph = result["phases"]
    keys = [k for k in ("mlflow", "s3t", "s3t_unbatched") if k in ph]
    axes[0].bar(keys, [ph[k]["requests_per_s"] for k in keys], color=["tab:gray", "tab:blue", "tab:cyan"][: len(keys)])
    axes[0].set_ylabel("requests/s")
    axes[0].set_title(f"{result['args']['clients']} clients; s3t: deletions every {result['args']['forget_every']} s", fontsize=9)
    for i, k in enumerate(keys):
        axes[0].text(i, ph[k]["requests_per_s"], f"p50 {ph[k]['p50_ms']:.0f} ms\np99 {ph[k]['p99_ms']:.0f} ms", ha="center", va="bottom", fontsize=7)
    forgets = ph["s3t"].get("forgets", [])
    for door, color in (("/forget", "tab:blue"), ("cli", "tab:orange")):
        vals = [f["from_commit_ms"] for f in forgets if f["door"] == door and f["from_commit_ms"] is not None]
        axes[1].plot(range(len(vals)), vals, "o-", color=color, label=f"{door}: honour committed -> first response on it")
    axes[1].set_ylabel("ms")
    axes[1].set_xlabel("deletion (in order)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


if __name__ == "__main__":
    main()
