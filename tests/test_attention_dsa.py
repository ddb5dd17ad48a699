"""`dsa`: lightning-indexer top-k attention.

The block executor equals the dense reference of the same selection (logits and gradients), the
selection equals one recomputed by hand from the indexer weights, topk >= length is the plain model,
the warm-up stage is the plain model while its loss trains only the indexer, decode selects what prefill
selects, and the indexer weights survive save -> from_pretrained. fp32, tiny models, 40-token rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lcplug
from lcplug.plugins.attention.dsa import (
    DSAAttention,
    enable_indexer_loss,
    indexer_loss,
    indexer_parameters,
    set_stage,
)
from lcplug.testing import decode_prefill_gap, descend, logits, padded_batch, tiny_model

TOL = 1e-5
SMALL = {"topk": 8, "block_size": 4, "heads": 2, "dim": 8}


def dsa(**params):
    return {"name": "dsa", **SMALL, "stage": "sparse", **params}


@pytest.fixture
def rows():
    """Two rows of 40 tokens; row 0 is left-padded by 5."""
    return padded_batch(40, seed=3)


def layer0(model) -> DSAAttention:
    return lcplug.patch_state(model).adapter.attention_modules(model)[0].lcplug_attention


def is_indexer(name: str) -> bool:
    return ".lcplug_attention.indexer." in name


@pytest.mark.parametrize("select", ["block", "token"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_torch_executor_equals_reference(family, select, rows):
    ids, mask = rows
    real = mask.bool()
    out = {}
    for executor in ("torch", "reference"):
        model = tiny_model(family)
        lcplug.patch(model, attention=dsa(select=select, executor=executor))
        out[executor] = logits(model, ids, mask)
    assert (out["torch"] - out["reference"])[real].abs().max() < TOL
    dense = logits(tiny_model(family), ids, mask)
    assert (out["torch"] - dense)[real].abs().max() > 1e-3, "topk=8 of 40 keys must change the output"


def hand_selection(layer: DSAAttention, query, key, mask, select: str) -> torch.Tensor:
    """The selection recomputed from the indexer weights in float64: (B, Lq, Lkv), True = attended."""
    ix = layer.indexer
    b, _, length, _ = query.shape
    x_q = query.transpose(1, 2).reshape(b, length, -1).double()
    x_k = key.transpose(1, 2).reshape(b, length, -1).double()
    q_i = (x_q @ ix.wq.double().T).view(b, length, ix.heads, ix.dim)
    k_i = F.layer_norm(x_k @ ix.wk.double().T, (ix.dim,), ix.k_norm.weight.double(), ix.k_norm.bias.double())
    w = (x_q @ ix.weights_proj.double().T) / math.sqrt(ix.heads * ix.dim)
    scores = (w[..., None] * torch.einsum("btjd,bsd->btjs", q_i, k_i).relu()).sum(2)
    start = (mask == 0).sum(-1).tolist()
    out = torch.zeros(b, length, length, dtype=torch.bool)
    for r in range(b):
        for t in range(start[r], length):
            visible = list(range(start[r], t + 1))
            if select == "token":
                ranked = sorted((s for s in visible if s != t), key=lambda s: (-scores[r, t, s].item(), -s))
                chosen = [t, *ranked[: layer.topk - 1]]
            else:
                block = {s: (s - start[r]) // layer.block_size for s in visible}
                best: dict[int, float] = {}
                for s in visible:
                    best[block[s]] = max(best.get(block[s], -math.inf), scores[r, t, s].item())
                own = block[t]
                ranked = sorted((k for k in best if k != own), key=lambda k: (-best[k], -k))
                kept = {own, *ranked[: layer.topk // layer.block_size - 1]}
                chosen = [s for s in visible if block[s] in kept]
            out[r, t, chosen] = True
    return out


@pytest.mark.parametrize("select", ["block", "token"])
def test_selection_matches_hand_computation(select, rows):
    ids, mask = rows
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa(select=select))
    layer = layer0(model)
    seen = {}
    handle = layer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    logits(model, ids, mask)
    handle.remove()
    _, query, key, _, lazy = seen["args"]
    layout = layer.layout(query, key, lazy, seen["kwargs"].get("position_ids"))
    got = layout.to_dense()[:, 0]
    expected = hand_selection(layer, query, key, mask, select)
    assert torch.equal(got, expected)
    assert expected[1, -1].sum() == 8  # the last query of the unpadded row keeps exactly topk keys


@pytest.mark.parametrize("select", ["block", "token"])
def test_gradients_equal_reference(select, rows):
    ids, mask = rows
    real = mask.bool()
    weights = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(0))
    grads = {}
    for executor in ("torch", "reference"):
        model = tiny_model("llama")
        lcplug.patch(model, attention=dsa(select=select, executor=executor))
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=mask).logits
        (out * weights)[real].sum().backward()
        grads[executor] = {"inputs": embeds.grad[real]}
        grads[executor].update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads["torch"].keys() == grads["reference"].keys()
    assert not any(is_indexer(n) for n in grads["torch"]), "the LM loss must not reach the indexer"
    for name, grad in grads["torch"].items():
        ref = grads["reference"][name]
        assert (grad - ref).abs().max() < TOL * max(1.0, ref.abs().max()), name  # fp32: relative to the scale


@pytest.mark.parametrize("select", ["block", "token"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_topk_at_least_length_is_full_attention(family, select, rows):
    ids, mask = rows
    model = tiny_model(family)
    lcplug.patch(model, attention=dsa(select=select, topk=64))
    real = mask.bool()
    assert (logits(model, ids, mask) - logits(tiny_model(family), ids, mask))[real].abs().max() < TOL


def test_warmup_is_the_model_and_its_loss_trains_only_the_indexer(rows):
    ids, mask = rows
    ref = logits(tiny_model("llama"), ids, mask)
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa(stage="warmup"))
    assert torch.equal(logits(model, ids, mask), ref)
    enable_indexer_loss(model)
    out = model(ids, attention_mask=mask).logits
    assert torch.equal(out.detach(), ref)
    loss = indexer_loss(model)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(is_indexer(n) for n in grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in indexer_parameters(model))


def test_sparse_losses_split_between_indexer_and_model(rows):
    ids, mask = rows
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa())
    enable_indexer_loss(model)
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward(retain_graph=True)
    lm = {n for n, p in model.named_parameters() if p.grad is not None}
    assert lm and not any(is_indexer(n) for n in lm)
    model.zero_grad(set_to_none=True)
    indexer_loss(model).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, _ in model.named_parameters() if is_indexer(n)
    }


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_loss_decreases(stage, rows):
    ids, mask = rows
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa(stage=stage))
    enable_indexer_loss(model)

    def kl():
        model(ids, attention_mask=mask)
        return indexer_loss(model)

    losses = descend(kl, indexer_parameters(model), steps=8, lr=1e-2)
    assert all(math.isfinite(v) and v >= 0 for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_set_stage_keeps_the_trained_indexer():
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa(stage="warmup"))
    enable_indexer_loss(model)
    with torch.no_grad():
        for p in indexer_parameters(model):
            p.add_(0.1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if is_indexer(n)}
    set_stage(model, "sparse")
    assert lcplug.manifest_of(model)["spec"]["attention"]["stage"] == "sparse"
    assert layer0(model).stage == "sparse" and layer0(model).compute_loss
    now = {n: p for n, p in model.named_parameters() if is_indexer(n)}
    assert now.keys() == trained.keys() and all(torch.equal(now[n], trained[n]) for n in now)


def test_indexer_init_is_deterministic_per_layer():
    a, b = tiny_model("llama"), tiny_model("llama")
    lcplug.patch(a, attention=dsa())
    torch.manual_seed(123)  # the global stream must not matter
    lcplug.patch(b, attention=dsa())
    pa = dict(a.named_parameters())
    pb = dict(b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    wq = [p for n, p in pa.items() if n.endswith("indexer.wq")]
    assert len(wq) == 3 and not torch.equal(wq[0], wq[1])


@pytest.mark.parametrize("select", ["block", "token"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_decode_equals_prefill(family, select, rows):
    ids, mask = rows
    ids, mask = ids[:, :24], mask[:, :24]
    model = tiny_model(family)
    lcplug.patch(model, attention=dsa(select=select))
    # the indexer reads post-RoPE states through linear maps, so (unlike the attention itself) it sees
    # absolute positions: the prefill gets the ones generate uses
    assert decode_prefill_gap(model, ids, mask, 12, generate_positions=True) < 2e-5


def test_save_and_reload_restores_the_indexer(rows, tmp_path):
    ids, mask = rows
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa(select="token"))
    with torch.no_grad():
        for p in indexer_parameters(model):
            p.mul_(-1.5)  # trained weights, not the init a re-patch would give
    ref = logits(model, ids, mask)
    lcplug.save_pretrained(model, tmp_path)
    loaded = lcplug.from_pretrained(tmp_path)
    assert lcplug.manifest_of(loaded)["spec"]["attention"]["select"] == "token"
    assert torch.equal(logits(loaded, ids, mask), ref)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"topk": 0}, "topk"),
        ({"topk": 6}, "topk"),  # select=block: not a multiple of block_size=4
        ({"block_size": 3}, "block_size"),
        ({"heads": 0}, "heads"),
        ({"dim": 0}, "dim"),
        ({"stage": "dense"}, "stage"),
        ({"select": "row"}, "select"),
        ({"executor": "cuda"}, "executor"),
    ],
)
def test_bad_params_raise(params, name):
    model = tiny_model("llama")
    with pytest.raises(lcplug.ParamError, match=repr(name)):
        lcplug.patch(model, attention=dsa(**params))
    assert lcplug.patch_state(model) is None


def test_topk_above_any_length_and_token_topk_off_block_patch():
    model = tiny_model("llama")
    lcplug.patch(model, attention=dsa(topk=1 << 20))
    lcplug.patch(model, attention=dsa(select="token", topk=6))
    assert layer0(model).indexer.heads == 2
    lcplug.patch(model, attention="dsa")  # defaults: capped at the model's 4 heads of dimension 16
    assert (layer0(model).indexer.heads, layer0(model).indexer.dim) == (4, 16)
