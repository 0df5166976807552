"""Gated DeltaNet (Qwen3-Next, Qwen3.5) linear attention: the causal depthwise conv1d with a saved
window (causal_conv1d_torch.py) and the gated delta rule, chunk-wise for prompts and recurrent
for single decode tokens (gated_delta_rule_torch.py). Torch references; they read and write each
request's state in place in its cache slot (`state_slots`), starting from zeros when the request
starts fresh. The decode forms skip rows whose slot is PAD_STATE_SLOT (CUDA-graph padding; torch
side: slot_rows.py)."""
