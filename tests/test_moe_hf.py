"""Mixtral parity with Hugging Face transformers (both directions, in memory and on disk) and the
published Mixtral parameter counts."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import main as cli_main  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.hf import from_hf, load_hf_checkpoint, save_hf_checkpoint, to_hf  # noqa: E402
from lmforge.model.params import count_params  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402


def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def routing_is_nontrivial(model, idx):
    """The test only means something if tokens really spread over different experts."""
    out = model(idx, output_router_logits=True)
    chosen = torch.topk(out.router_logits[0], 2, dim=-1).indices
    return len(torch.unique(chosen)) == model.config.num_local_experts


def test_mixtral_hf_to_lmforge_logits_match():
    hf = tiny_mixtral()
    idx = torch.randint(0, 96, (2, 17))
    assert routing_is_nontrivial(hf, idx)
    ours = from_hf(hf).eval()
    assert ours.config.n_expert == 4 and ours.config.router == "softmax_topk"
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_mixtral_lmforge_to_hf_logits_match():
    cfg = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48, block_size=64,
                      n_expert=4, n_expert_per_token=2)
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    hf = to_hf(ours).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    idx = torch.randint(0, 96, (2, 17))
    assert routing_is_nontrivial(hf, idx)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)


def test_mixtral_checkpoint_files_both_directions(tmp_path):
    hf = tiny_mixtral(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_checkpoint(tmp_path / "hf").eval()
    idx = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)
    save_hf_checkpoint(ours, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)


def mixtral_count_by_hand(cfg: ModelConfig) -> tuple[int, int]:
    """Total and active parameters from the architecture, term by term."""
    C, F, E, k, L, V = cfg.n_embd, cfg.ffn_hidden, cfg.n_expert, cfg.n_expert_per_token, cfg.n_layer, cfg.vocab_size
    attn = C * cfg.n_head * cfg.head_dim + 2 * C * cfg.n_kv_head * cfg.head_dim + cfg.n_head * cfg.head_dim * C
    expert = 3 * C * F
    per_layer_fixed = attn + E * C + 2 * C  # attention, router, two norms
    total = 2 * V * C + C + L * (per_layer_fixed + E * expert)
    active = 2 * V * C + C + L * (per_layer_fixed + k * expert)
    return total, active


@pytest.mark.parametrize("preset,total_b,active_b", [("mixtral-8x7b", "46.7", "12.9"), ("mixtral-8x22b", "141", "39")])
def test_mixtral_parameter_counts_match_published(preset, total_b, active_b, capsys):
    cfg = ModelConfig.from_preset(preset)
    counts = count_params(cfg)
    total, active = mixtral_count_by_hand(cfg)
    assert (counts["total"], counts["active"]) == (total, active)
    # Mistral's announcements: 8x7B "46.7B total, 12.9B active"; 8x22B "141B total, 39B active"
    digits = len(total_b.split(".")[1]) if "." in total_b else 0
    assert f"{total / 1e9:.{digits}f}" == total_b
    digits = len(active_b.split(".")[1]) if "." in active_b else 0
    assert f"{active / 1e9:.{digits}f}" == active_b
    assert cli_main(["params", preset]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"{re.escape(total_b)}B parameters", out), out
    assert re.search(r"active per token\s+" + re.escape(active_b), out), out
