"""transformers' side of the vision-language correctness tests (Qwen3-VL, Qwen3.5 with images):
the shared prompts, the reference model per tiny checkpoint, its inputs with each image pad
expanded as the processor does, and its greedy continuation."""

import functools

import numpy as np
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.multimodal.processor import mrope_positions
from dlengine.testing import tiny_checkpoint
from dlengine.testing.vl import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, tiny_image

from hf_reference import relative_error

MAX_NEW = 16
# (text, images): a 32 x 32 image is 16 tokens, a 40 x 24 one 15 (a 5 x 3 merged grid)
CASES = [
    ("The quick brown fox jumps over the lazy dog. hello world", []),
    ("Once upon a time " + IMAGE_PLACEHOLDER + " there was a tiny language model", [tiny_image()]),
    ("hello " + IMAGE_PLACEHOLDER + " and " + IMAGE_PLACEHOLDER + " world", [tiny_image(), tiny_image(40, 24, seed=1)]),
]
# tiny checkpoint -> transformers' class
HF_CLASSES = {
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
    "qwen3-vl-moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3.5-vl": "Qwen3_5ForConditionalGeneration",
    "qwen3.5-moe-vl": "Qwen3_5MoeForConditionalGeneration",
}


@functools.lru_cache(maxsize=4)
def hf_vl(kind: str):
    import transformers as tf

    path = tiny_checkpoint(kind)
    cls = getattr(tf, HF_CLASSES[kind])
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tf.AutoImageProcessor.from_pretrained(path), tf.AutoTokenizer.from_pretrained(path)


def hf_inputs(kind: str, text: str, images: list) -> dict:
    """transformers' model inputs, each image pad expanded to its token count as its processor does."""
    _, image_processor, tokenizer = hf_vl(kind)
    ids, kwargs = tokenizer.encode(text), {}
    if images:
        kwargs = dict(image_processor(images=images, return_tensors="pt"))
        counts = iter((kwargs["image_grid_thw"].prod(-1) // 4).tolist())
        ids = [t for tok in ids for t in ([tok] * next(counts) if tok == IMAGE_TOKEN_ID else [tok])]
    input_ids = torch.tensor([ids])
    return dict(kwargs, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).int())


@functools.lru_cache(maxsize=None)
def hf_greedy(kind: str, case: int) -> tuple[list[int], list[int]]:
    """(expanded prompt ids, greedy continuation) of CASES[case]."""
    model = hf_vl(kind)[0]
    inputs = hf_inputs(kind, *CASES[case])
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def requests(cases=CASES) -> list[dict]:
    return [{"prompt": text, "images": images} for text, images in cases]


# scheduling regimes every VL model must be exact under
SETUPS = {
    "default": dict(cache=dict(block_size=16)),
    # an image's 16 tokens split over several steps, sharing them with other requests' decodes
    # (a hybrid model's chunks resume its DeltaNet state)
    "chunked-8": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=8)),
    "preemption": dict(cache=dict(block_size=16, num_blocks=6), scheduler=dict(max_model_len=96)),
    # the next step is scheduled (placeholder tokens) while this one runs
    "async-chunked-8": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=8),
                            async_scheduling=True),
}


def build(kind: str, setup: dict):
    b = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(**setup["cache"])
    if "scheduler" in setup:
        b.scheduler(**setup["scheduler"])
    if "async_scheduling" in setup:
        b.async_scheduling(setup["async_scheduling"])
    return b.build()


def check_mrope_positions(kind: str) -> None:
    """The front's M-RoPE positions equal the reference's get_rope_index for a two-image prompt."""
    model = hf_vl(kind)[0]
    inputs = hf_inputs(kind, *CASES[2])
    ref, ref_delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"])
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID and (i == 0 or ids[i - 1] != IMAGE_TOKEN_ID)]
    ours, delta = mrope_positions(ids, list(zip(starts, map(tuple, inputs["image_grid_thw"].tolist()))), 2)
    np.testing.assert_array_equal(ours, ref[:, 0].numpy())
    assert delta == int(ref_delta)


def check_first_step_logprobs(engine, kind: str) -> None:
    """Every vocabulary entry's log-probability after each CASES prompt, float32, within 1e-4."""
    assert_first_step_logprobs(engine, hf_vl(kind)[0], requests(), [hf_inputs(kind, *case) for case in CASES])


def assert_first_step_logprobs(engine, model, reqs: list[dict], hf_inputs_list: list[dict]) -> None:
    """Our first-step log-probabilities of `reqs` against transformers' `model` on the matching
    inputs: the same expanded prompt ids and every vocabulary entry within 1e-4 relative."""
    vocab = engine.config.model.vocab_size
    outs = engine.generate(reqs, SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab))
    for i, (out, inputs) in enumerate(zip(outs, hf_inputs_list, strict=True)):
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            ref = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
        ours = torch.tensor([out.logprobs[0][t] for t in range(vocab)])
        assert relative_error(ours, ref) < 1e-4, f"case {i}"


def check_greedy_tokens(kind: str, setup: str) -> None:
    """Greedy tokens of every CASES prompt equal the reference's under SETUPS[setup]; the setup
    really ran (preemptions, small chunks) and every block is back."""
    engine = build(kind, SETUPS[setup])
    outs = engine.generate(requests(), SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for i, out in enumerate(outs):
        prompt, expected = hf_greedy(kind, i)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == expected, f"case {i} diverged"
    if setup == "preemption":
        assert engine.stats.num_preemptions > 0
    if "chunked" in setup:
        assert max(s.num_tokens for s in engine.stats.steps) <= 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()
