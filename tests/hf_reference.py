"""The oracle: transformers' own implementation on the same checkpoint."""

import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def hf_greedy(path: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(path)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(path)(torch.tensor([token_ids])).logits[0].float()


def hf_logits_torch_only(path: str, token_ids: list[int]) -> torch.Tensor:
    """hf_logits computed in a separate process with kernel packages (fla-core) hidden, so the
    oracle is transformers' torch code even where such a package is installed (GPU runs)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_oracle_torch_only.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, script, path, json.dumps(list(token_ids)), out], check=True, env=env)
        return torch.load(out)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


@functools.lru_cache(maxsize=None)
def reference_greedy(kind: str, prompts: tuple, max_new_tokens: int) -> tuple:
    """transformers' greedy continuation of each prompt on the tiny checkpoint `kind` (cached)."""
    from dlengine.testing import tiny_checkpoint

    path = tiny_checkpoint(kind)
    return tuple(tuple(hf_greedy(path, list(p), max_new_tokens)) for p in prompts)


# scheduling regimes the correctness tests run every model under (setup name -> builder options)
SCHEDULING_SETUPS = {
    "default": dict(cache=dict(block_size=16)),
    "chunked-32": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=32)),
    "prefix-cache-twice": dict(cache=dict(block_size=16)),
    "preemption": dict(cache=dict(block_size=16, num_blocks=40), scheduler=dict(max_model_len=512)),
}


def build_for_setup(path: str, setup: dict):
    """A float32 engine with a setup's cache / scheduler / async_scheduling options."""
    from dlengine import EngineBuilder

    b = EngineBuilder(path).dtype("float32")
    if "cache" in setup:
        b.cache(**setup["cache"])
    if "scheduler" in setup:
        b.scheduler(**setup["scheduler"])
    if "async_scheduling" in setup:
        b.async_scheduling(setup["async_scheduling"])
    return b.build()


def check_greedy_setup(kind: str, name: str, setup: dict, prompts: list, max_new_tokens: int) -> None:
    """Greedy tokens equal transformers' under one scheduling regime; the regime really happened
    (preemptions, mixed chunked steps, prefix-cache hits on a second round) and every block
    comes back."""
    from dlengine import SamplingParams
    from dlengine.testing import tiny_checkpoint

    engine = build_for_setup(tiny_checkpoint(kind), setup)
    expected = reference_greedy(kind, tuple(map(tuple, prompts)), max_new_tokens)
    rounds = 2 if name == "prefix-cache-twice" else 1
    for r in range(rounds):
        engine.stats.reset()
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
        for i, (out, want) in enumerate(zip(outs, expected)):
            assert out.token_ids == list(want), f"round {r}: prompt {i} (len {len(prompts[i])}) diverged"
    if name == "prefix-cache-twice":
        assert engine.stats.num_cached_tokens > 0  # the second round read its prompts from the cache
    if name.endswith("preemption"):
        assert engine.stats.num_preemptions > 0
    if name.endswith("chunked-32"):
        assert max(s.num_tokens for s in engine.stats.steps) <= 32
        # a long prompt's chunks share steps with other requests' decodes
        assert any(s.num_decodes > 0 and s.num_prefill_tokens > 0 for s in engine.stats.steps)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()


def checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files."""
    import os

    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, f)))
    return tensors


def copy_checkpoint(path: str, out: str, tensors: dict | None = None, config: dict | None = None) -> str:
    """`path`'s config and tokenizer files in `out`, with `tensors` (default: the same weights)
    as its one safetensors file and `config` (default: the same) as its config.json."""
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    for f in os.listdir(path):
        if not f.endswith(".safetensors") and not f.endswith(".index.json"):
            shutil.copy(os.path.join(path, f), os.path.join(out, f))
    save_file(checkpoint_tensors(path) if tensors is None else tensors, os.path.join(out, "model.safetensors"))
    if config is not None:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f)
    return out
