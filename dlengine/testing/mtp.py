"""A tiny DeepSeek-V3 checkpoint with a trained multi-token-prediction (MTP) layer.

The tiny "deepseek-v3" checkpoint plus one next-n layer at index num_hidden_layers, laid out as
DeepSeek ships it (`model.layers.3.{enorm,hnorm,eh_proj,self_attn.*,mlp.*,shared_head.*}`,
config num_nextn_predict_layers = 1). A random MTP layer would almost never guess the target's
tokens, so it is trained (fixed seed, a few hundred Adam steps, seconds on CPU) to predict the
tiny model's own greedy continuations: at position p it sees the target's final hidden state h_p
and the embedding of t_{p+1}, and learns t_{p+2}. Acceptance in speculative decoding is then
well above zero, which is what the tests need to exercise accepted drafts.

The layer is trained with transformers' own DeepseekV3DecoderLayer as its block (written with
`save_pretrained` to get the on-disk names), so the engine's layer is checked against weights it
did not produce.
"""

from __future__ import annotations

import contextlib

import json
import os
import shutil
import tempfile

TRAIN_STEPS = 200
NUM_SEQUENCES = 32
PROMPT_LEN = 6
SEQ_LEN = 40
DATA_SEED_OFFSET = 11


def mtp_training_prompts(seed: int = 0, vocab_size: int = 512) -> list[list[int]]:
    """The prompts whose greedy continuations (SEQ_LEN - PROMPT_LEN tokens) the MTP layer of
    `tiny_checkpoint("deepseek-v3-mtp", seed)` was trained on. A layer this small trained this
    briefly learns these continuations rather than the tiny random model in general, so tests
    that need accepted drafts decode these prompts."""
    import torch

    gen = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
    return torch.randint(2, vocab_size, (NUM_SEQUENCES, PROMPT_LEN), generator=gen).tolist()


def _greedy_sequences(model, vocab_size: int, seed: int):
    """The training prompts continued greedily by the model (no early stop): the training data."""
    import torch

    seqs = torch.tensor(mtp_training_prompts(seed, vocab_size))
    with torch.no_grad():
        for _ in range(SEQ_LEN - PROMPT_LEN):
            logits = model(seqs).logits[:, -1]
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
    return seqs


def _causal_mask(n: int, t: int):
    import torch

    mask = torch.full((t, t), float("-inf")).triu(1)
    return mask.expand(n, 1, t, t)


@contextlib.contextmanager
def one_torch_thread():
    """Run the block on one torch thread: training these tiny heads on more threads only
    contends (tests run in parallel); the previous count comes back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_mtp(mtp, ce, hidden, embeds, labels, params):
    """TRAIN_STEPS of Adam on an MTP head (`mtp(hidden, embeds)` -> its outputs, `ce(outputs,
    labels)` -> the loss of the target's next-next tokens); returns the final loss. Depth 2
    (chained drafts) is trained too: at position q the head gets its own output at q - 1 in
    place of h_q, beside the same embedding of t_{q+1}, and must still predict t_{q+2}."""
    import torch

    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(TRAIN_STEPS):
        y = mtp(hidden, embeds)
        y2 = mtp(torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1), embeds)
        loss = ce(y, labels) + 0.5 * ce(y2[:, 1:], labels[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def write_mtp_checkpoint(src: str, path: str, mtp_tensors: dict, loss: float, edit_config) -> str:
    """`src`'s checkpoint plus `mtp_tensors`, at `path`: tokenizer and other files copied,
    config.json through `edit_config(cfg)` (which declares the MTP layer), and the training's
    settings and final loss in mtp_training.json."""
    from safetensors.torch import load_file, save_file

    os.makedirs(path, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors.update(mtp_tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(src):
        if f not in ("model.safetensors", "config.json", "dlengine_recipe.json"):
            shutil.copy(os.path.join(src, f), os.path.join(path, f))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    edit_config(cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "mtp_training.json"), "w") as f:
        json.dump({"steps": TRAIN_STEPS, "sequences": NUM_SEQUENCES, "seq_len": SEQ_LEN, "final_loss": loss}, f)
    return path


def train_mtp_layer(src: str, seed: int = 0) -> tuple[dict, float]:
    """The trained next-n layer's tensors, named as in a DeepSeek-V3 checkpoint, and the final
    loss (on one thread)."""
    with one_torch_thread():
        return _train_mtp_layer(src, seed)


def _train_mtp_layer(src: str, seed: int) -> tuple[dict, float]:
    import torch
    from torch import nn
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    torch.manual_seed(seed)
    target = DeepseekV3ForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    cfg = target.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size

    # a model one layer deeper: its last layer is the MTP block (save_pretrained then names it)
    deeper_cfg = DeepseekV3Config.from_pretrained(src)
    deeper_cfg.num_hidden_layers = n_layers + 1
    deeper = DeepseekV3ForCausalLM(deeper_cfg).to(torch.float32)
    block = deeper.model.layers[n_layers]
    block.load_state_dict(target.model.layers[n_layers - 1].state_dict())  # start from a trained-shape layer
    enorm, hnorm = DeepseekV3RMSNorm(hidden, cfg.rms_norm_eps), DeepseekV3RMSNorm(hidden, cfg.rms_norm_eps)
    eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
    head_norm = DeepseekV3RMSNorm(hidden, cfg.rms_norm_eps)
    head = nn.Linear(hidden, cfg.vocab_size, bias=False)
    with torch.no_grad():
        eh_proj.weight.copy_(torch.randn(eh_proj.weight.shape) / (2 * hidden) ** 0.5)
        head_norm.weight.copy_(target.model.norm.weight)
        head.weight.copy_(target.lm_head.weight)
    modules = nn.ModuleList([block, enorm, hnorm, eh_proj, head_norm, head])
    for p in modules.parameters():
        p.requires_grad_(True)

    seqs = _greedy_sequences(target, cfg.vocab_size, seed)
    with torch.no_grad():
        h = target.model(seqs).last_hidden_state  # after the final norm: what the LM head reads
    t = SEQ_LEN - 2  # positions p = 0 .. SEQ_LEN - 3 have a t_{p+2}
    positions = torch.arange(t).expand(NUM_SEQUENCES, t)
    embeds = target.model.embed_tokens(seqs[:, 1:t + 1]).clone()
    embeds[:, 0] = 0  # position 0 sees no token embedding (MultiTokenPredictionLayer does the same)
    labels = seqs[:, 2:t + 2].clone()
    labels[:, : PROMPT_LEN - 2] = -100  # random prompt tokens cannot be predicted
    mask = _causal_mask(NUM_SEQUENCES, t)
    rope = target.model.rotary_emb(embeds, positions)

    def mtp(hidden_in, embeds_in):
        x = eh_proj(torch.cat([enorm(embeds_in), hnorm(hidden_in)], dim=-1))
        y = block(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        return y[0] if isinstance(y, tuple) else y

    def ce(y, target_labels):
        return nn.functional.cross_entropy(head(head_norm(y)).reshape(-1, cfg.vocab_size), target_labels.reshape(-1))

    loss = fit_mtp(mtp, ce, h[:, :t], embeds, labels, modules.parameters())

    prefix = f"model.layers.{n_layers}."
    with tempfile.TemporaryDirectory() as tmp:
        deeper.save_pretrained(tmp, safe_serialization=True)
        from safetensors.torch import load_file

        saved = load_file(os.path.join(tmp, "model.safetensors"))
    tensors = {k: v.detach().clone() for k, v in saved.items() if k.startswith(prefix)}
    tensors.update({
        prefix + "enorm.weight": enorm.weight, prefix + "hnorm.weight": hnorm.weight,
        prefix + "eh_proj.weight": eh_proj.weight, prefix + "shared_head.norm.weight": head_norm.weight,
        prefix + "shared_head.head.weight": head.weight,
        # DeepSeek's checkpoints carry a copy of the shared embedding in the MTP layer
        prefix + "embed_tokens.weight": target.model.embed_tokens.weight,
    })
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}, float(loss.detach())


def build_mtp_checkpoint(src: str, path: str, seed: int = 0) -> str:
    """`src` (a tiny DeepSeek-V3 checkpoint) plus a trained next-n layer, written to `path`."""
    mtp_tensors, loss = train_mtp_layer(src, seed)
    return write_mtp_checkpoint(src, path, mtp_tensors, loss, lambda cfg: cfg.update(num_nextn_predict_layers=1))
