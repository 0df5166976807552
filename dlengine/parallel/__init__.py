"""Distributed execution (tensor parallel, attention-DP x expert-parallel, KV transfer).

Nothing here yet: this version runs one process (ParallelConfig must be tp=1, attention_dp=1,
ffn_ep=1, and build() says so otherwise). The parallelism and PD-disaggregation issues fill it.
"""
