"""transformers' side of the vision-language correctness tests (Qwen3-VL, Qwen3.5 with images):
the shared prompts, the reference model per tiny checkpoint, its inputs with each image pad
expanded as the processor does, and its greedy continuation."""

import functools

import torch

from dlengine.testing import tiny_checkpoint
from dlengine.testing.vl import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, tiny_image

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
