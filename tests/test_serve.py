"""The Ray Serve application over real HTTP on a local Ray: pages, bad input, cold start,
batching and /v1/score against the offline reward scorer."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch
import yaml

from pagellm.config import load_config, save_config
from pagellm.data.pipeline import run_data_stage
from pagellm.models.policy import build_policy, save_policy
from pagellm.models.reward import reward_model_from_policy, save_reward_model
from pagellm.serve.client import PageLLMError, get_page, score_page
from pagellm.vocab import Vocab
from ports import free_ports
from waiting import RAY_NODE_START_TIMED_OUT, http_ok, wait_until

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.simulator.users=40", "data.simulator.items=60", "data.simulator.categories=4",
         "data.simulator.interactions_per_user=20", "serve.max_k=20", "serve.max_history=30"]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """One run with a reward model at /, the same run without one at /bare."""
    from ray import serve

    from pagellm.serve.app import build_app

    cfg = load_config(None, SMALL)
    root = tmp_path_factory.mktemp("served") / "run"
    run_data_stage(cfg, root / "data", log=lambda *_: None)
    save_config(cfg, root / "config.yaml")
    vocab = Vocab.from_parquet(root / "data" / "vocab.parquet")
    save_policy(*build_policy(cfg.model, vocab, seed=0), root / "sft")
    torch.manual_seed(0)
    reward, tok, layout = reward_model_from_policy(root / "sft", ("coarse", "fine"))
    save_reward_model(reward, tok, layout, root / "reward")
    bare = root.parent / "bare"
    for part in ("data", "sft"):
        (bare / part).parent.mkdir(parents=True, exist_ok=True)
        (bare / part).symlink_to(root / part)

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([  # both replicas start in parallel
        serve.RunTarget(target=build_app(root, cfg), name="pagellm_test", route_prefix="/"),
        serve.RunTarget(target=build_app(bare, cfg), name="pagellm_bare", route_prefix="/bare"),
    ])
    items = pd.read_parquet(root / "data" / "items.parquet")
    evals = pd.read_parquet(root / "data" / "eval.parquet")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "root": root, "cfg": cfg, "vocab": vocab, "items": items,
               "evals": evals}
    finally:
        serve.shutdown()


def user_history(served, row: int) -> tuple[str, list[str]]:
    vocab, record = served["vocab"], served["evals"].iloc[row]
    return vocab.user_ids[int(record["user_index"])], [vocab.item_ids[int(i)] for i in record["prompt_test"]]


def post(served, path: str, body, raw: bool = False) -> requests.Response:
    data = body if raw else json.dumps(body)
    return requests.post(served["url"] + path, data=data, timeout=60)


def test_health_names_both_models(served):
    health = requests.get(served["url"] + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model_version"].startswith("sft@")
    assert health["reward_model_version"].startswith("reward@")
    bare = requests.get(served["url"] + "/bare/healthz", timeout=30).json()
    assert bare["reward_model_version"] is None and bare["model_version"] == health["model_version"]


def test_pages_hold_k_distinct_known_items_outside_history_and_exclusions(served):
    known = set(served["items"]["item_id"])
    for row in range(4):
        user, history = user_history(served, row)
        exclude = sorted(known - set(history))[row * 3 : row * 3 + 3]
        resp = post(served, "/v1/page", {"user_id": user, "history": history, "k": 10, "exclude": exclude})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        ids = [item["item_id"] for item in page["items"]]
        assert len(ids) == 10 == len(set(ids)) and set(ids) <= known
        assert not set(ids) & (set(history) | set(exclude))
        assert page["fallback"] is None and page["warnings"] == []
        assert all(item["score"] <= 0 for item in page["items"])
        assert set(page["timings_ms"]) == {"queue", "decode", "total"}
        assert page["model_version"].startswith("sft@")


def test_concurrent_requests_are_batched_and_each_gets_its_own_page(served):
    bodies = []
    for row in range(12):
        user, history = user_history(served, row % len(served["evals"]))
        bodies.append({"user_id": user, "history": history[-(row % 5 + 1) :], "k": 3 + row % 6})
    alone = [post(served, "/v1/page", b).json() for b in bodies]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda b: post(served, "/v1/page", b).json(), bodies))
    for a, b, body in zip(alone, together, bodies):
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        assert len(b["items"]) == body["k"]
    # Requests that rode in one batch report the same decode time; 12 at once cannot all ride alone.
    assert len({p["timings_ms"]["decode"] for p in together}) < len(together)


def test_cold_start_unknown_history_and_unknown_user(served):
    user, history = user_history(served, 0)
    page = post(served, "/v1/page", {"user_id": "new-user", "history": history + ["ghost-1", 404], "k": 5}).json()
    assert page["fallback"] is None and len(page["items"]) == 5
    assert page["warnings"] == [
        "history ids not in the catalogue were skipped: ['ghost-1', '404']",
        "unknown user_id 'new-user': served from the history alone",
    ]
    assert not {i["item_id"] for i in page["items"]} & set(history)


def test_nothing_usable_gets_a_popularity_page(served):
    items = served["items"].sort_values(["popularity", "index"], ascending=[False, True])
    top = items["item_id"].tolist()
    page = post(served, "/v1/page", {"user_id": "nobody", "history": ["x"], "k": 4, "exclude": top[:2]}).json()
    assert page["fallback"] == "popularity"
    assert [i["item_id"] for i in page["items"]] == top[2:6]
    assert "no known user and no known history item: serving the most popular items" in page["warnings"]


def test_a_short_catalogue_gives_a_short_page_with_a_warning(served):
    all_items = served["items"]["item_id"].tolist()
    user, _ = user_history(served, 1)
    page = post(served, "/v1/page", {"user_id": user, "history": all_items[:25], "k": 20,
                                     "exclude": all_items[25:50]}).json()
    ids = [i["item_id"] for i in page["items"]]
    assert sorted(ids) == sorted(all_items[50:]) and len(ids) == len(all_items) - 50 < 20
    assert page["warnings"][-1].startswith(f"only {len(ids)} items can be served")


BAD_PAGES = [
    (b'{"history": ["a"', "invalid request: malformed JSON: EOF while parsing"),
    (b"", "invalid request: empty body; send a JSON object"),
    (b'["a"]', "invalid request: the request body must be a JSON object, got array"),
    (b'{"k": "10"}', "invalid request: k: Input should be a valid integer, got string"),
    (b'{"k": 0}', "invalid request: k: k must be between 1 and 20, got 0"),
    (b'{"k": 21}', "invalid request: k: k must be between 1 and 20, got 21"),
    (b'{"history": {"a": 1}}', "invalid request: history: Input should be a valid array, got object"),
    (b'{"history": ["a", null]}', "invalid request: history[1]: an id must be a string or an integer, got null"),
    (b'{"exclude": [1.5]}', "invalid request: exclude[0]: an id must be a string or an integer, got number 1.5"),
    (json.dumps({"history": ["a"] * 31}).encode(), "invalid request: history: history holds 31 items; the limit is 30"),
    (b'{"histroy": []}', "invalid request: histroy: unknown field"),
]


@pytest.mark.parametrize("body, message", BAD_PAGES)
def test_bad_page_requests_get_422_with_a_readable_message(served, body, message):
    resp = post(served, "/v1/page", body, raw=True)
    assert resp.status_code == 422
    assert resp.json()["error"].startswith(message), resp.json()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"history": [], "page": []}, "invalid request: page: page is empty; send at least one item id"),
        ({"history": []}, "invalid request: page: Field required"),
        ({"page": "i1"}, "invalid request: page: Input should be a valid array, got string"),
        ({"page": ["ghost", "ghost2"]},
         "invalid request: page holds item ids not in the catalogue: ['ghost', 'ghost2']"),
    ],
)
def test_bad_score_requests_get_422(served, body, message):
    resp = post(served, "/v1/score", body)
    assert resp.status_code == 422 and resp.json()["error"] == message


def test_wrong_method_and_path(served):
    resp = requests.get(served["url"] + "/v1/page", timeout=30)
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error"] == "/v1/page takes POST, not GET"
    resp = requests.post(served["url"] + "/v2/page", data="{}", timeout=30)
    assert resp.status_code == 404 and "routes: GET /healthz, POST /v1/page, POST /v1/score" in resp.json()["error"]
    resp = requests.get(served["url"] + "/bare/v1/nowhere", timeout=30)  # under a route prefix too
    assert resp.status_code == 404 and resp.json()["error"].startswith("no route GET /v1/nowhere;")


def test_openapi_schema_describes_the_routes_and_bodies(served):
    schema = requests.get(served["url"] + "/openapi.json", timeout=30).json()
    assert {"/healthz", "/v1/page", "/v1/score"} <= set(schema["paths"])
    body = schema["paths"]["/v1/page"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"user_id", "history", "k", "exclude"} == set(body["properties"]) and body["additionalProperties"] is False
    assert "PageResponse" in schema["components"]["schemas"]
    assert requests.get(served["url"] + "/docs", timeout=30).status_code == 200


def test_score_agrees_with_the_offline_reward_scorer(served):
    from pagellm.models.reward_scorer import RewardScorer

    vocab = served["vocab"]
    scorer = RewardScorer.load(served["root"] / "reward", device="cpu")
    users, prompts, pages, answers = [], [], [], []
    for row in range(3):
        user, history = user_history(served, row)
        served_page = post(served, "/v1/page", {"user_id": user, "history": history}).json()
        page_ids = [i["item_id"] for i in served_page["items"]]
        answers.append(post(served, "/v1/score", {"user_id": user, "history": history, "page": page_ids}).json())
        users.append(vocab.user_index(user))
        prompts.append([vocab.item_index(h) for h in history])
        pages.append([vocab.item_index(p) for p in page_ids])
    r_c, r_f = scorer.score(users, prompts, pages)
    for n, answer in enumerate(answers):
        assert answer["r_c"] == pytest.approx(float(r_c[n]), abs=1e-4)
        assert answer["r_f"] == pytest.approx(float(r_f[n]), abs=1e-4)
        assert answer["r"] == pytest.approx(answer["r_c"] + answer["r_f"], abs=1e-6)
        assert answer["model_version"].startswith("reward@") and answer["warnings"] == []
    # Cold start on /v1/score: an unknown user is scored from the history alone.
    user, history = user_history(served, 0)
    page_ids = [vocab.item_ids[p] for p in pages[0]]
    cold = post(served, "/v1/score", {"user_id": "zz", "history": history, "page": page_ids})
    c_c, c_f = scorer.score([None], [prompts[0]], [pages[0]])
    assert cold.json()["r_c"] == pytest.approx(float(c_c[0]), abs=1e-4)
    assert cold.json()["warnings"] == ["unknown user_id 'zz': served from the history alone"]


def test_score_without_a_reward_model_is_503(served):
    resp = post(served, "/bare/v1/score", {"history": [], "page": ["x"]})
    assert resp.status_code == 503
    assert resp.json()["error"].startswith("no reward model in ") and "pagellm reward --run" in resp.json()["error"]


def test_python_client(served):
    user, history = user_history(served, 2)
    page = get_page(served["url"], history, k=6, user_id=user, exclude=[history[0]])
    assert len(page["items"]) == 6
    scores = score_page(served["url"], history, [i["item_id"] for i in page["items"]], user_id=user)
    assert scores["r"] == pytest.approx(scores["r_c"] + scores["r_f"])
    with pytest.raises(PageLLMError, match="HTTP 422: invalid request: k: k must be between 1 and 20, got 99") as err:
        get_page(served["url"], history, k=99)
    assert err.value.status == 422


def test_serve_deploy_config_and_app_builder(served):
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import app_builder

    spec = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(spec)  # what `serve deploy` checks first
    (app,) = spec["applications"]
    assert app["import_path"] == "jobs.serve:app_builder" and "run_dir" in app["args"]
    built = app_builder({"run_dir": str(served["root"]), "set": ["serve.max_batch_size=4"]})
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="args.run_dir"):
        app_builder({})


def test_prepare_ingress_sets_the_switch_only_for_a_ray_it_will_start(monkeypatch):
    import ray

    from pagellm.serve.ingress import HAPROXY_ENV, prepare_ingress

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(HAPROXY_ENV, "0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    prepare_ingress("haproxy")
    assert os.environ[HAPROXY_ENV] == "1"
    prepare_ingress("proxy")
    assert os.environ[HAPROXY_ENV] == "0"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a running Ray keeps its ingress
    said = []
    prepare_ingress("haproxy", log=said.append)
    assert os.environ[HAPROXY_ENV] == "0" and "already running" in said[0]


def test_pagellm_serve_behind_haproxy_answers_pages(served, tmp_path):
    """`pagellm serve --set serve.ingress=haproxy` in its own process and Ray: HAProxy on the
    configured port, replicas answering HTTP themselves behind it."""
    import signal
    import subprocess
    import sys
    import time

    port, stats_port, metrics_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")}
    env.update(RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0", PYTHONPATH=str(ROOT))
    # HAProxy's stats and metrics ports default to 8404 and 9101 on every interface: any other
    # HAProxy on the box (another run, or one a crashed Serve left behind) would make this
    # one fail to start. Free ports of its own keep the test independent of that.
    env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(stats_port), RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics_port))
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240

    def start() -> tuple[subprocess.Popen, int]:
        """The server process, and where its output starts in the log."""
        offset = log.stat().st_size if log.exists() else 0
        with log.open("a") as out:
            return subprocess.Popen([sys.executable, "-m", "jobs.serve", "--run", str(served["root"]),
                                     "--set", "serve.ingress=haproxy", "--set", f"serve.port={port}",
                                     "--verbose"],  # the HAProxy line below is Ray's own log
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True), offset

    proc, offset = start()
    try:
        # While HAProxy starts, /healthz may refuse, hold the connection past the read
        # timeout or answer 503: all of that is "not ready yet" until the deadline. A server
        # whose own Ray missed its start-up window is started again, within the same deadline.
        while True:
            problem = wait_until(lambda: http_ok(url + "/healthz"), max(1.0, deadline - time.monotonic()),
                                 gave_up=lambda: proc.poll() is not None)
            latest = log.read_bytes()[offset:].decode(errors="replace")
            ray_missed_start = proc.poll() is not None and RAY_NODE_START_TIMED_OUT in latest
            if not (problem and ray_missed_start and time.monotonic() < deadline - 30):
                break
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever that Ray had started
            except ProcessLookupError:
                pass
            proc, offset = start()
        if problem:
            raise AssertionError(f"server never became healthy ({problem}):\n{log.read_text()[-3000:]}")
        user, history = user_history(served, 0)
        resp = requests.post(url + "/v1/page", json={"user_id": user, "history": history, "k": 5}, timeout=60)
        assert resp.status_code == 200, resp.text
        ids = [item["item_id"] for item in resp.json()["items"]]
        assert len(ids) == 5 == len(set(ids)) and not set(ids) & set(history)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "HAProxy started successfully" in log.read_text()  # not Serve's Python proxy
