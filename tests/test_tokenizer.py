import pytest
import torch

from dlengine.testing import tiny_checkpoint
from dlengine.tokenizer import IncrementalDetokenizer, load_tokenizer


@pytest.mark.parametrize("use_stream", [True, False])
def test_incremental_detokenizer_matches_batch_decode(use_stream):
    tok = load_tokenizer(tiny_checkpoint("qwen3"))
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = torch.randint(0, 512, (40,), generator=g).tolist()  # includes specials and ids past the vocab
        ids += tok.encode("héllo wörld ✓ 日本")  # multi-byte characters split over tokens
        d = IncrementalDetokenizer(tok)
        if not use_stream:
            d._stream = None
        pieces = [d.update(ids[: i + 1]) for i in range(len(ids))]
        pieces.append(d.flush(ids))
        assert "".join(pieces) == d.text == tok.decode(ids, skip_special_tokens=True)
