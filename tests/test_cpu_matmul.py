"""The seam between the model's Linear and the engine's CPU matmuls (lmforge.infer.cpu_matmul):
the model never sets the hook, the engine does (transposed copies only where its lean decode
step does not cover the model), and with gradients on the hook is bypassed."""

import torch
import torch.nn.functional as F

from lmforge.infer.cpu_matmul import keep_transposed_weights
from lmforge.infer.engine import Engine
from lmforge.model import ModelConfig, Transformer
from lmforge.model.transformer import Linear
from lmforge.tokenizer import train


def linears(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


def test_engine_installs_the_hook_the_model_never_sets():
    tok = train("the hook lives with the engine, not the model. " * 30, vocab_size=300, workers=1)
    for overrides, transposed in ((dict(), False),  # the lean DecodeStep keeps its own copies
                                  (dict(norm="layernorm", activation="gelu", pos_emb="learned", bias=True), True)):
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=4, block_size=32, **overrides)
        model = Transformer(cfg).eval()
        assert all(m.decode_matmul is None for m in linears(model))
        engine = Engine(model, tok)
        assert (engine.decode_step is not None) == (not transposed)
        assert all(m.decode_matmul is not None and m.decode_matmul.transposed == transposed for m in linears(model))


def test_gradients_bypass_the_hook():
    torch.manual_seed(0)
    lin = Linear(64, 32)
    assert keep_transposed_weights(lin)
    x = torch.randn(1, 64, requires_grad=True)
    y = lin(x)  # one row with gradients on: plain F.linear, no copy made
    assert lin.decode_matmul.weight_t is None and y.grad_fn is not None
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    assert lin.decode_matmul.weight_t is not None and lin.decode_matmul.weight_t.shape == (64, 32)
