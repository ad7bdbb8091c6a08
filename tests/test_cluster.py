"""PageLLM on a real Ray cluster: cluster.yaml against Ray's own launcher validator, the
KubeRay manifest's shape, and the tiny pipeline submitted with `ray job submit` to a
two-node cluster started on loopback with `ray start`.

Why the cluster is stopped by process id and never with `ray stop`: `ray stop` kills
every Ray process on the machine, including this pytest session's `ray_local` instance
and anything else running Ray here. Each node is started with `ray start --block`, which
keeps the node's processes (GCS, raylet, dashboard) as children bound to the `ray start`
process; terminating those two processes takes the whole cluster down (the job driver
goes with its supervisor actor), and a final sweep kills by pid whatever still names one
of this cluster's private temp dirs. The nodes also get SIGTERM if pytest itself dies.
The cluster's environment strips RAY_* variables and uses its own ports, temp dirs and
auth token, so it never meets the test process's own Ray.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ports import free_ports
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv running the tests: its `ray` and `python`
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 600  # the job took 4.5-7 min on a 2-core box shared with other test runs
NODE_START_TIMEOUT_S = 180

# The tiny pipeline, small enough for a loaded 2-core box: every stage still runs.
PIPELINE_SETTINGS = [
    "data.simulator.users=80", "data.simulator.items=60", "data.simulator.categories=6",
    "data.simulator.interactions_per_user=20", "data.sft_windows=1",
    "sft.meta_epochs=1", "sft.epochs=1", "reward.epochs=1", "reward.onpolicy_samples=8",
    "ppo.steps=2", "ppo.batch_size=16", "ppo.mini_batch_size=8",
    "ppo.epochs=1", "ppo.checkpoint_every=1", "stage3.publish=last", "eval.list_len=20", "eval.max_users=40",
    "eval.baselines=[popularity]", "stage3.algorithm=ppo",  # the actor-based RL loop on a real cluster
]


# ----------------------------------------------------------------------------- cluster.yaml


def _cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it touches a cloud: fill in the provider's defaults, merge
    # the setup commands, then check the result against ray-schema.json and its own rules.
    prepared = prepare_config(_cluster_config())
    validate_config(prepared)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {"gpu_gpt2", "gpu_llama"} <= set(gpu_types)
    assert gpu_types["gpu_llama"]["resources"]["GPU"] >= 4  # one Train worker per GPU for the Llama config
    # Setup commands install this project on every node (after the common ones are merged in).
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "pagellm" in c for c in prepared[key]), key


def test_cluster_yaml_invalid_is_rejected_by_the_validator():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = _cluster_config()
    broken["available_node_types"]["gpu_gpt2"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError, match="not_a_field"):
        validate_config(prepare_config(broken))


def test_gpu_configs_fit_the_cluster_node_types():
    from pagellm.config import load_config

    types = _cluster_config()["available_node_types"]
    for config, node_type in (("gpt2.yaml", "gpu_gpt2"), ("llama-3.2-1b-lora.yaml", "gpu_llama")):
        cfg = load_config(ROOT / "configs" / config)
        gpus = types[node_type]["resources"]["GPU"] * types[node_type]["max_workers"]
        for section in (cfg.sft, cfg.reward):
            assert section.use_gpu and section.workers <= gpus, (config, node_type)
        assert cfg.ppo.use_gpu


def test_rayjob_manifest_runs_the_pipeline_on_shared_storage():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"].startswith("ray.io/")
    assert "python -m jobs.pipeline" in job["spec"]["entrypoint"]
    assert job["spec"].get("shutdownAfterJobFinishes") is True
    cluster = job["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups.values()
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits), "at least one worker group has GPUs"
    # Every pod mounts the same volume where the run folder lives.
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    mounts = [{m["mountPath"] for c in p["spec"]["containers"] for m in c.get("volumeMounts", [])} for p in pods]
    shared = set.intersection(*mounts)
    assert shared, "head and workers must share a mount for the run folder"
    env = {e["name"]: e.get("value") for p in pods for c in p["spec"]["containers"] for e in c.get("env", [])}
    assert any(env.get("PAGELLM_STORAGE", "").startswith(m) for m in shared)


# ----------------------------------------------------------------------------- where a run folder goes


def test_place_run_puts_relative_runs_under_storage(tmp_path, monkeypatch):
    from jobs.common import place_run

    monkeypatch.chdir(tmp_path)
    assert place_run("/abs/run", "/mnt/shared") == Path("/abs/run")
    assert place_run("demo", "/mnt/shared/runs") == Path("/mnt/shared/runs/demo")
    assert place_run("demo", "file:///mnt/shared/runs") == Path("/mnt/shared/runs/demo")
    assert place_run("runs/demo", None) == tmp_path / "runs" / "demo"  # local: the cwd, made absolute


def test_place_run_refuses_what_other_nodes_could_not_see():
    from jobs.common import place_run
    from pagellm.config import ConfigError

    with pytest.raises(ConfigError, match="temporary working directory"):
        place_run("demo", None, submitted_job=True)
    with pytest.raises(ConfigError, match="mount the bucket"):
        place_run("demo", "s3://bucket/runs")
    with pytest.raises(ConfigError, match="absolute path"):
        place_run("demo", "relative/storage")


def test_storage_comes_from_config_then_environment(tmp_path, monkeypatch):
    from jobs.common import open_run, stage_parser

    monkeypatch.setenv("PAGELLM_STORAGE", str(tmp_path / "from_env"))
    args = stage_parser("data", "").parse_args(["--run", "a"])
    folder, cfg = open_run(args)
    assert folder.root == tmp_path / "from_env" / "a" and cfg.run_dir == str(folder.root)
    args = stage_parser("data", "").parse_args(["--run", "b", "--set", f"storage={tmp_path / 'from_cfg'}"])
    folder, cfg = open_run(args)
    assert folder.root == tmp_path / "from_cfg" / "b" and (folder.root / "config.yaml").exists()


# ----------------------------------------------------------------------------- a live cluster


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies, so even a killed test run does not
    leave a cluster behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


class LoopbackCluster:
    """A head and a worker node started with `ray start --block` on 127.0.0.1."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        # One per node, as on real machines: nodes sharing a session dir share the runtime-env
        # cache, and one node's cleanup deletes the job's working dir under the other. Short,
        # because Ray's unix socket paths live under them and must stay under 108 bytes.
        self.temp_dirs = {name: Path(tempfile.mkdtemp(prefix="plr", dir="/tmp")) for name in ("head", "worker")}
        # Every port either node opens, picked at once so that none is picked twice.
        ports = iter(free_ports(3 + 2 * len(NODE_PORT_FLAGS)))
        self.gcs_port, self.dashboard_port, self.client_port = next(ports), next(ports), next(ports)
        self.node_ports = {name: [arg for flag in NODE_PORT_FLAGS for arg in (flag, str(next(ports)))]
                           for name in ("head", "worker")}
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is the venv's
            RAY_USAGE_STATS_ENABLED="0",
            # Token auth with a token of this cluster's own, so neither ~/.ray/auth_token nor
            # another cluster's token decides whether the nodes and the CLI can talk.
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
            TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
        )
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _start_node(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            self.nodes.append(subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1",
                                                "--num-cpus", "2", "--num-gpus", "0",
                                                "--temp-dir", str(self.temp_dirs[name]), *args, *self.node_ports[name]],
                                               env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True, preexec_fn=_die_with_parent))

    def start(self) -> None:
        self._start_node("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                                  "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                  "--ray-client-server-port", str(self.client_port), "--disable-usage-stats"])
        self._wait(lambda: self.ray("job", "list", "--address", self.address, check=False).returncode == 0,
                   "the head's job server")
        self._start_node("worker", ["--address", f"127.0.0.1:{self.gcs_port}"])
        self._wait(lambda: self.alive_nodes() == 2, "two alive nodes")

    def _wait(self, ready, what: str) -> None:
        exited = lambda: any(p.poll() is not None for p in self.nodes)  # noqa: E731
        problem = wait_until(ready, NODE_START_TIMEOUT_S, interval_s=2, gave_up=exited)
        if problem and exited():
            raise RuntimeError(f"`ray start` exited while waiting for {what} ({problem}):\n{self.tail_logs()}")
        if problem:
            raise TimeoutError(f"no {what} ({problem}):\n{self.tail_logs()}")

    def ray(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def alive_nodes(self) -> int:
        out = self.ray("list", "nodes", "--address", self.address, "--format", "json", check=False)
        if out.returncode != 0:
            return 0
        try:
            return sum(n["state"] == "ALIVE" for n in json.loads(out.stdout))
        except (json.JSONDecodeError, KeyError, TypeError):
            return 0

    def tail_logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.logs if log.exists())

    def stop(self) -> None:
        """SIGTERM to every `ray start --block` (each node drains for up to 30 s, then takes
        its processes down), SIGKILL to those still running after 45 s."""
        for proc in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 45
        for proc in self.nodes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        for pid in self._leftover_pids():
            _terminate(pid)
        for path in self.temp_dirs.values():
            shutil.rmtree(path, ignore_errors=True)

    def _leftover_pids(self) -> list[int]:
        """Processes of this cluster still alive: their command line names one of its temp dirs."""
        import psutil

        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if any(str(path) in line for path in self.temp_dirs.values()):
                mine.append(proc.info["pid"])
        return mine


def _terminate(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout=10)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.NoSuchProcess:
        pass


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory):
    cluster = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _job_status(cluster: LoopbackCluster, job_id: str) -> str:
    """SUCCEEDED / FAILED / STOPPED / PENDING / RUNNING / UNKNOWN from `ray job status`."""
    try:
        proc = cluster.ray("job", "status", "--log-style", "record", "--address", cluster.address, job_id,
                           check=False, timeout=60)
    except subprocess.TimeoutExpired:  # a busy head answering slowly: not an answer yet
        return "UNKNOWN"
    out = proc.stdout + proc.stderr
    # The CLI words terminal states as sentences and the others as "Status for job 'id': X".
    for phrase, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job_id}' {phrase}" in out:
            return status
    found = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", out)
    return found.group(1) if found else "UNKNOWN"


@pytest.mark.timeout(JOB_TIMEOUT_S + 2 * NODE_START_TIMEOUT_S + 120)
def test_tiny_pipeline_submitted_to_a_two_node_cluster(loopback_cluster, tmp_path):
    cluster = loopback_cluster
    storage = tmp_path / "shared"  # the "shared storage": both nodes are on this machine
    job_id = f"pagellm-test-{secrets.token_hex(4)}"
    runtime_env = {"excludes": [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"],
                   "env_vars": {"PAGELLM_STORAGE": str(storage)}}
    settings = [arg for s in PIPELINE_SETTINGS for arg in ("--set", s)]
    cluster.ray("job", "submit", "--address", cluster.address, "--submission-id", job_id, "--no-wait",
                "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
                "python", "-m", "jobs.pipeline", "--run", "tiny", "--config", "configs/tiny.yaml", *settings)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = "PENDING"  # polled, as `ray job submit --no-wait` returns at once
    while time.monotonic() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(5)
        status = _job_status(cluster, job_id)
    if status != "SUCCEEDED":
        if status not in ("FAILED", "STOPPED"):
            cluster.ray("job", "stop", "--address", cluster.address, job_id, check=False)
        logs = cluster.ray("job", "logs", "--address", cluster.address, job_id, check=False).stdout
        present = sorted(p.name for p in (storage / "tiny").glob("*")) if (storage / "tiny").exists() else []
        pytest.fail(f"job {job_id} ended {status}; run folder holds {present}\n--- job logs (tail)\n"
                    f"{logs[-12000:]}\n{cluster.tail_logs()}")

    run = storage / "tiny"  # the relative --run went under PAGELLM_STORAGE
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["users"] > 0 and stats["sft_rows"] > 0
    assert (run / "sft" / "metrics.json").exists() and (run / "sft" / "pagellm_policy.json").exists()
    assert (run / "reward" / "metrics.json").exists()
    assert (run / "ppo" / "DONE").exists()
    steps = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines() if line]
    assert steps[-1]["step"] == 2
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"popularity", "sft", "ppo"} <= set(metrics["models"])
    assert (run / "eval" / "report.md").exists()
    _check_eval_scored_the_published_policies(run, metrics)
    _check_reward_fidelity_judged_the_pages_eval_scored(metrics)
    # Per-user rows (pagellm/eval/paired.py compares models on them) average to the means.
    import pandas as pd

    rows = pd.read_parquet(run / "eval" / "per_user.parquet")
    for name in ("sft", "ppo"):
        for key in ("hr@10", "ndcg@10", "sim_utility"):
            assert rows.loc[rows["model"] == name, key].mean() == pytest.approx(metrics["models"][name][key], abs=1e-6)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run_dir"] == str(run) and saved["ppo"]["steps"] == 2

    # The work really was spread over both nodes: actors ran on two different node ids.
    actors = json.loads(cluster.ray("list", "actors", "--address", cluster.address, "--format", "json",
                                    "--detail", "--limit", "1000").stdout)
    assert len({a["node_id"] for a in actors if a.get("node_id")}) == 2


def _check_eval_scored_the_published_policies(run: Path, metrics: dict) -> None:
    """The job's evaluation, recomputed here from the run folder the nodes wrote: the same
    numbers for the SFT and PPO policies, and PPO's pages are its own (it published weights
    that moved away from SFT's), so the cluster's eval read the policies the stages published."""
    import torch
    from safetensors.torch import load_file

    from pagellm.config import load_config
    from pagellm.eval.metrics import tail_items_from_counts
    from pagellm.eval.runner import load_eval_set, policy_output, score_model

    cfg = load_config(run / "config.yaml")
    es = load_eval_set(run / "data", "test", cfg.eval.max_users)
    tail = tail_items_from_counts(es.popularity)
    for name in ("sft", "ppo"):
        out = policy_output(run / name, es, cfg.eval.list_len, cfg.eval.batch_size, cfg.eval.exclude_history)
        again = score_model(out, es, cfg, tail, sim_ctx=None)
        for key in ("ndcg@10", "hr@10", "ndcg@100", "recall@20", "full/ndcg@100"):
            assert metrics["models"][name][key] == pytest.approx(again[key], abs=1e-9), (name, key)
    sft, ppo = (load_file(str(run / name / "model.safetensors")) for name in ("sft", "ppo"))
    assert sft.keys() == ppo.keys()
    assert any(not torch.equal(sft[key], ppo[key]) for key in sft), "PPO published the SFT weights unchanged"


def _check_reward_fidelity_judged_the_pages_eval_scored(metrics: dict) -> None:
    """The fidelity block's greedy page is the SFT page eval scored (same utility to the last
    digit: pages, users and truth line up), the oracle beats it for nearly every user, and
    the truth's own best of S is at least the sampled mean."""
    block = metrics["reward_fidelity"]
    assert block["users"] == metrics["users"] and block["samples_per_user"] == 8
    assert block["greedy_utility"] == pytest.approx(metrics["models"]["sft"]["sim_utility"], abs=1e-12)
    assert block["oracle_utility"] == pytest.approx(metrics["sim_oracle_utility"], abs=1e-12)
    assert block["oracle_above_greedy/truth"] >= 0.9
    assert block["best_of_S/truth"] >= block["sampled_mean"]
    assert all(-1.0 <= block[f"spearman/{s}"] <= 1.0 for s in ("R", "R_c", "R_f", "policy_logprob", "popularity"))
