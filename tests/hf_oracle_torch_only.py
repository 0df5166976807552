"""transformers' float32 logits of one prompt, computed with its torch reference code only.

transformers picks an installed kernel package (fla-core for Gated DeltaNet) at import time, and
some versions call it even on CPU tensors, which fails; our CPU oracle must be the readable torch
path in any case. This runs in its own process, where the kernel package is hidden before
transformers is imported (a `None` entry in sys.modules makes its import fail):

    python tests/hf_oracle_torch_only.py CHECKPOINT TOKENS_JSON OUT.pt
"""

import json
import sys

HIDDEN_KERNEL_PACKAGES = ("fla", "causal_conv1d")


def main(path: str, tokens_json: str, out: str) -> None:
    for name in HIDDEN_KERNEL_PACKAGES:
        sys.modules[name] = None
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([json.loads(tokens_json)])).logits[0].float()
    torch.save(logits, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
