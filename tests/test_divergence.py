"""The KL to the SFT policy that eval reports for every stage-3 algorithm."""

import torch

from pagellm.config import load_config
from pagellm.eval.divergence import kl_to_reference
from pagellm.models.policy import build_policy, save_policy
from pagellm.vocab import PromptEncoder, Vocab


def test_kl_is_zero_to_itself_and_positive_to_a_policy_that_moved(tmp_path):
    cfg = load_config(None, ["model.init.n_layer=1", "model.init.n_embd=32"])
    vocab = Vocab.build([f"u{i}" for i in range(4)], [f"i{i}" for i in range(15)])
    model, tok, layout = build_policy(cfg.model, vocab, seed=0)
    save_policy(model, tok, layout, tmp_path / "sft")
    encoder = PromptEncoder(tok, layout)
    prompts = [encoder.encode_prompt(u, [u, u + 5]) for u in range(4)]
    exclude = [{u, u + 5} for u in range(4)]
    same = kl_to_reference(tmp_path / "sft", tmp_path / "sft", prompts, exclude, k=5, samples=3, batch_size=5, seed=0)
    assert abs(same["kl_to_sft"]) < 1e-5 and same["kl_to_sft_se"] < 1e-5  # every log-ratio is 0
    with torch.no_grad():  # sharpen the item logits: a policy that moved away from the reference
        out = model.get_output_embeddings()
        out.weight[layout.item_offset : layout.item_offset + 3] *= 25.0
    save_policy(model, tok, layout, tmp_path / "moved")
    moved = kl_to_reference(tmp_path / "moved", tmp_path / "sft", prompts, exclude, k=5, samples=16, batch_size=16,
                            seed=0)
    assert moved["kl_to_sft"] > 3 * moved["kl_to_sft_se"] > 0
