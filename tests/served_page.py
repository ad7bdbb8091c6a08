"""One check shared by the stage-3 tests: `pagellm serve`'s engine finds a run's published
stage-3 policy by the run config's algorithm and writes a valid page from it."""

import json

from pagellm.config import save_config


def assert_serves_its_stage3_policy(run_dir, cfg, algorithm: str) -> None:
    from pagellm.serve.engine import PageEngine, find_policy
    from pagellm.serve.schemas import PageRequest, parse_request

    save_config(cfg, run_dir / "config.yaml")
    assert find_policy(run_dir) == (algorithm, run_dir / algorithm)
    engine = PageEngine.load(run_dir, cfg, device="cpu")
    request = parse_request(PageRequest, json.dumps({"user_id": engine.vocab.user_ids[0],
                                                     "history": engine.vocab.item_ids[:3], "k": 5}),
                            max_k=50, max_history=200)
    page = engine.page(request)
    assert page.fallback is None and len(page.item_ids) == 5 == len(set(page.item_ids))
    assert not set(page.item_ids) & set(engine.vocab.item_ids[:3])
