"""lm-eval's `local-completions` model against dlengine serve, on a tiny local task (no hub
download): its loglikelihood requests (echo + logprobs over token-id prompts) must give the
log-probabilities Engine.prompt_logits gives."""

import json
import math

import pytest

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
lm_eval = pytest.importorskip("lm_eval", reason="optional: pip install lm-eval")

import torch  # noqa: E402

from serve_helpers import serving, tiny_engine  # noqa: E402

DOCS = [{"context": "The quick brown fox", "target": " jumps over the lazy dog."},
        {"context": "Paged attention keeps", "target": " the key value cache in blocks"},
        {"context": "Once upon a time there was", "target": " a tiny language model"}]

TASK = """task: dlengine_tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_loglikelihood(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    engine = tiny_engine()
    try:
        tok = engine.tokenizer
        expected = []
        for d in DOCS:  # lm-eval's split: the continuation's tokens are what follows the context's
            ctx = tok.encode(d["context"])
            whole = tok.encode(d["context"] + d["target"])
            lsm = torch.log_softmax(engine.prompt_logits(whole), dim=-1)
            expected.append(sum(lsm[j - 1, whole[j]].item() for j in range(len(ctx), len(whole))))
        path = engine.config.model.path
        with serving(engine) as s:
            results = simple_evaluate(
                model="local-completions",
                model_args=f"base_url={s.url}/v1/completions,model=tiny,tokenizer={path},"
                           "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1,batch_size=2",
                tasks=["dlengine_tiny_loglikelihood"], task_manager=TaskManager(include_path=str(tmp_path)),
                log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
            s.wait_idle()
    finally:
        engine.close()
    samples = sorted(results["samples"]["dlengine_tiny_loglikelihood"], key=lambda x: x["doc_id"])
    got = [s["resps"][0][0][0] for s in samples]
    assert all(math.isfinite(g) for g in got)
    assert got == pytest.approx(expected, abs=1e-3)
    assert 0 <= results["results"]["dlengine_tiny_loglikelihood"]["acc,none"] <= 1
