"""Tiny Qwen3.5-MoE / Qwen3-Next checkpoints with a trained multi-token-prediction head (`mtp.*`).

The tiny hybrid (testing/hybrid.py) plus the MTP head in the released layout
(models/qwen3_next_mtp.py: `mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`,
`mtp.layers.0.*` one full-attention decoder layer with the MoE, `mtp.norm`; the embedding and the
LM head are the target's), config `mtp_num_hidden_layers = 1` (Qwen3.5, under text_config) or
`num_nextn_predict_layers = 1` (Qwen3-Next). Experts are stored as the target's are: fused for
Qwen3.5-MoE, per expert for Qwen3-Next.

transformers does not build the MTP head, so it is written here: the decoder layer is
transformers' own (the class of the target's full-attention layer, starting from its weights),
the norms transformers' zero-centred RMSNorm, fc a bias-free linear. As for the DeepSeek head
(testing/mtp.py), a random head would almost never guess the target's tokens, so it is trained
(fixed seed, a few hundred Adam steps, seconds on one CPU core) on the tiny model's own greedy
continuations of `mtp_training_prompts()`: at position p it sees the target's final hidden
state h_p and the embedding of t_{p+1}, and learns t_{p+2} through the target's (frozen) LM head;
also chained once (its own output at p - 1 in place of h_p). Acceptance in speculative decoding
on those prompts is then well above zero, which is what the tests need.
"""

from __future__ import annotations

from dlengine.testing.mtp import (NUM_SEQUENCES, PROMPT_LEN, SEQ_LEN, fit_mtp, mtp_training_prompts, one_torch_thread,
                                  write_mtp_checkpoint)

# derived kind -> the tiny hybrid it extends
HYBRID_MTP_KINDS = {"qwen3.5-moe-mtp": "qwen3.5-moe", "qwen3-next-mtp": "qwen3-next"}


def _greedy_sequences(model, seed: int, vocab_size: int):
    """The training prompts continued greedily by the target (no early stop)."""
    import torch

    seqs = torch.tensor(mtp_training_prompts(seed, vocab_size))
    with torch.no_grad():  # whole forwards, no cache: plain argmax, eos never treated specially
        for _ in range(SEQ_LEN - PROMPT_LEN):
            logits = model(seqs).logits[:, -1]
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
    return seqs


def train_hybrid_mtp(src: str, seed: int = 0) -> tuple[dict, float]:
    """The trained head's tensors, named as in the released checkpoints (experts fused), and the
    final loss (on one thread)."""
    with one_torch_thread():
        return _train(src, seed)


def _train(src: str, seed: int) -> tuple[dict, float]:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    for p in target.parameters():
        p.requires_grad_(False)
    text, cfg = target.model, target.config
    hidden = cfg.hidden_size
    full = list(cfg.layer_types).index("full_attention")
    template = text.layers[full]
    block = type(template)(cfg, layer_idx=full).to(torch.float32)  # transformers' own decoder layer
    block.load_state_dict(template.state_dict())  # start from a trained-shape layer
    norm_cls = type(text.norm)  # the zero-centred RMSNorm
    emb_norm, hid_norm, out_norm = (norm_cls(hidden, cfg.rms_norm_eps) for _ in range(3))
    fc = nn.Linear(2 * hidden, hidden, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape) / (2 * hidden) ** 0.5)
        out_norm.weight.copy_(text.norm.weight)
    modules = nn.ModuleList([block, emb_norm, hid_norm, fc, out_norm])
    for p in modules.parameters():
        p.requires_grad_(True)
    block.train()

    seqs = _greedy_sequences(target, seed, cfg.vocab_size)
    with torch.no_grad():
        h = text(seqs).last_hidden_state  # after the final norm: what the LM head reads
    t = SEQ_LEN - 2  # positions p = 0 .. SEQ_LEN - 3 have a t_{p+2}
    positions = torch.arange(t).expand(NUM_SEQUENCES, t)
    embeds = text.embed_tokens(seqs[:, 1:t + 1]).clone()
    labels = seqs[:, 2:t + 2].clone()
    labels[:, : PROMPT_LEN - 2] = -100  # random prompt tokens cannot be predicted
    mask = torch.full((t, t), float("-inf")).triu(1).expand(NUM_SEQUENCES, 1, t, t)
    mrope = "qwen3_5" in cfg.model_type
    rope = text.rotary_emb(embeds, positions[None].expand(3, -1, -1) if mrope else positions)

    def mtp(hidden_in, embeds_in):
        x = fc(torch.cat([emb_norm(embeds_in), hid_norm(hidden_in)], dim=-1))
        y = block(x, position_embeddings=rope, attention_mask=mask, position_ids=positions)
        return out_norm(y[0] if isinstance(y, tuple) else y)

    def ce(y, target_labels):
        return nn.functional.cross_entropy(target.lm_head(y).reshape(-1, cfg.vocab_size), target_labels.reshape(-1))

    loss = fit_mtp(mtp, ce, h[:, :t], embeds, labels, modules.parameters())

    tensors = {f"mtp.layers.0.{k}": v for k, v in block.state_dict().items()}
    tensors.update({"mtp.fc.weight": fc.weight, "mtp.pre_fc_norm_embedding.weight": emb_norm.weight,
                    "mtp.pre_fc_norm_hidden.weight": hid_norm.weight, "mtp.norm.weight": out_norm.weight})
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}, float(loss.detach())


def _per_expert(tensors: dict) -> dict:
    """Fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] as per-expert
    gate / up / down tensors (Qwen3-Next's on-disk layout)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            stem, i = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = t[e, :i].contiguous()
                out[f"{stem}{e}.up_proj.weight"] = t[e, i:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            stem = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    return out


def build_hybrid_mtp_checkpoint(kind: str, src: str, path: str, seed: int = 0) -> str:
    """`src` (the tiny hybrid HYBRID_MTP_KINDS[kind]) plus a trained MTP head, written to `path`."""
    mtp_tensors, loss = train_hybrid_mtp(src, seed)
    if kind == "qwen3-next-mtp":
        mtp_tensors = _per_expert(mtp_tensors)

    def declare_mtp(cfg: dict) -> None:
        if "text_config" in cfg:  # Qwen3.5: the text model's fields, as released
            cfg["text_config"].update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)
        else:
            cfg["num_nextn_predict_layers"] = 1

    return write_mtp_checkpoint(src, path, mtp_tensors, loss, declare_mtp)
