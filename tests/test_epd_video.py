"""Videos through encode-prefill-decode disaggregation over DLSlime's TCP transport: an encoder
engine (role "encode") encodes a request's videos (and images) with the vision tower call a
hybrid engine makes, and a prefill (or hybrid) engine pulls the embeddings and uses them where it
would have computed them.

The encoder's video embeddings are the model's own (bit for bit in float32); E -> P -> D in three
OS processes gives one hybrid engine's greedy tokens for a video prompt and a video + image
prompt, and the second round hits the prefill side's prefix cache past the video; params that
describe other videos are refused before any pull; an encoder killed while a video's embeddings
are being read ends the request with a clear error and every buffer back (and, with
on_pull_failure="local", the request is encoded here instead)."""

import time

import pytest

try:
    import dlslime  # noqa: F401
except ImportError as e:  # CI installs it (.ci/run); say why when it is not there
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

import torch

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.disagg.worker import WorkerEngine
from dlengine.testing.vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, tiny_image, tiny_video

from epd_helpers import (GREEDY, MODEL, STAGING, assert_pool_full, assert_pulled, encoder_worker,  # noqa: E402
                         run, stop_process, wait_encoder_released, wait_prefill_released, worker_final)

# tiny random models have small logit gaps, so greedy tokens alone could hide a wrong embedding:
# the log-probabilities are compared too
SCORED = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3)
BLOCK = 16
VIDEO_TEXT = "<|im_start|>user\n" + VIDEO_PLACEHOLDER + "What happens in it?<|im_end|>\n<|im_start|>assistant\n"
MIXED_TEXT = "Compare " + IMAGE_PLACEHOLDER + " with\n" + VIDEO_PLACEHOLDER + " please"


def save_frames(folder, frames, name: str) -> list[str]:
    """PNG files (lossless: the same pixels as the PIL frames) for worker processes."""
    paths = []
    for k, frame in enumerate(frames):
        paths.append(str(folder / f"{name}-{k}.png"))
        frame.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two videos and an image as files: 4 frames of 32 x 32 (2 temporal patches of 16 tokens)
    and 6 frames of 40 x 24 at 1 fps (3 of 15)."""
    folder = tmp_path_factory.mktemp("epd-video")
    return {"video": save_frames(folder, tiny_video(), "a"),
            "video_fps": {"frames": save_frames(folder, tiny_video(6, 40, 24, seed=1), "b"), "fps": 1.0},
            "image": save_frames(folder, [tiny_image(seed=3)], "image")[0]}


def cases(media) -> list[dict]:
    """A video prompt and a video + image prompt."""
    return [{"prompt": VIDEO_TEXT, "videos": [media["video"]]},
            {"prompt": MIXED_TEXT, "images": [media["image"]], "videos": [media["video_fps"]]}]


def encode_args(prompt: dict) -> dict:
    return {"images": prompt.get("images", []), "videos": prompt["videos"]}


def local(role="hybrid", prefix_caching=True, **encoder_cache):
    b = EngineBuilder(MODEL).dtype("float32").cache(block_size=BLOCK, prefix_caching=prefix_caching)
    b.scheduler(max_model_len=256)
    b.encoder_cache(**{**STAGING, **encoder_cache})
    if role != "hybrid":
        b.role(role).transfer("dlslime", transport="tcp")
    return b.build()






def assert_same_output(out, ref, first_elsewhere: bool = False) -> None:
    """Same greedy tokens, and the same top log-probabilities at each step (`first_elsewhere`:
    a decode engine's output, whose first token the prefill engine sampled: its log-probabilities
    start at the second token)."""
    assert out.error is None, out.error
    assert out.token_ids == ref.token_ids
    want = ref.logprobs[1:] if first_elsewhere else ref.logprobs
    assert len(out.logprobs) == len(want)
    for step, (got, exp) in enumerate(zip(out.logprobs, want)):
        assert got.keys() == exp.keys(), f"step {step}"
        assert list(got.values()) == pytest.approx(list(exp.values()), abs=1e-5), f"step {step}"




def assert_receive_region_free(engine) -> dict:
    pulls = engine.describe()["ec_pulls"]
    assert pulls["in_flight"] == 0 and pulls["quarantined_bytes"] == 0
    assert pulls["receive_free_bytes"] == pulls["receive_bytes"]
    return pulls




# ------------------------------------------------------------------ in one process
def test_video_embeddings_are_the_models_and_the_prefill_side_uses_them(monkeypatch):
    """The encoder's embeddings of a video and an image equal the hybrid model's encoder cache
    (bit for bit, float32); the params describe each input (grid, tokens, content hash); a
    hybrid engine given them gives its own tokens without running its vision tower; params
    that describe another video, or not the request's inputs, or a broken layout, are refused."""
    encoder = EngineBuilder(MODEL).dtype("float32").role("encode").transfer("dlslime").encoder_cache(**STAGING).build()
    hybrid = local(prefix_caching=False)  # the pulled runs must compute the prompt, not find it cached
    try:
        image, video = tiny_image(seed=3), {"frames": tiny_video(6, 40, 24, seed=1), "fps": 1.0}
        mixed = {"prompt": MIXED_TEXT, "images": [image], "videos": [video]}
        only_video = {"prompt": VIDEO_TEXT, "videos": [tiny_video()]}
        mm = hybrid.make_request(mixed).multimodal
        tokens, deepstack = hybrid.model.model.encode_images(mm)
        embedded = encoder.embed([image], [video])
        assert [e.grid_thw for e in embedded] == [mm.images[0].grid_thw, mm.videos[0].grid_thw] == [(1, 8, 8),
                                                                                                   (3, 6, 10)]
        assert torch.equal(torch.cat([e.embeddings for e in embedded], dim=1), torch.stack([tokens, *deepstack]))
        refs = [run(hybrid, p, SCORED) for p in (mixed, only_video)]

        ec = encoder.encode([image], videos=[video])
        [v] = ec["videos"]
        assert v["grid_thw"] == [3, 6, 10] and v["num_tokens"] == 45 == mm.videos[0].num_tokens
        assert v["content_hash"] == mm.videos[0].content_hash.hex()
        assert ec["images"][0]["content_hash"] == mm.images[0].content_hash.hex()

        def no_local_encode(*args, **kwargs):
            raise AssertionError("the vision tower ran although the embeddings were pulled")

        with monkeypatch.context() as m:
            m.setattr(hybrid.model.model.visual, "forward", no_local_encode)
            assert_same_output(run(hybrid, mixed, SCORED, ec_transfer_params=ec), refs[0])
            ec_video = encoder.encode(videos=only_video["videos"])
            assert ec_video["images"] == [] and [v["num_tokens"] for v in ec_video["videos"]] == [32]
            assert_same_output(run(hybrid, only_video, SCORED, ec_transfer_params=ec_video), refs[1])
        assert hybrid.describe()["ec_pulls"]["pulled"] == 2
        encoder.poll()
        assert encoder.num_pinned == 0 and encoder.counts["released_done"] == 2
        assert encoder.counts["videos"] == 2 and encoder.counts["video_tokens"] == 45 + 32

        other = {"frames": tiny_video(6, 40, 24, seed=2), "fps": 1.0}  # same size, other pixels
        bad = [(encoder.encode([image], videos=[other]), "video 0 was encoded from another video"),
               (encoder.encode(videos=[video]), "describe 0 images but the request has 1"),
               (encoder.encode([image]), "describe 0 videos but the request has 1")]
        for ec_bad, match in bad:
            with pytest.raises(InvalidRequestError, match=match):
                hybrid.add_request(mixed, GREEDY, ec_transfer_params=ec_bad)
            assert encoder.release(ec_bad["request_id"])
        ec = encoder.encode([image], videos=[video])
        gap = {**ec, "videos": [{**ec["videos"][0], "offset": ec["videos"][0]["offset"] + 64}]}
        with pytest.raises(InvalidRequestError, match="not back to back"):
            hybrid.add_request(mixed, GREEDY, ec_transfer_params=gap)
        with pytest.raises(InvalidRequestError, match="no image and no video"):
            hybrid.add_request(mixed, GREEDY, ec_transfer_params={**ec, "images": [], "videos": []})
        with pytest.raises(InvalidRequestError, match=r"video 0 needs content_hash"):
            hybrid.add_request(mixed, GREEDY, ec_transfer_params={**ec, "videos": [{"offset": 0}]})
        assert encoder.release(ec["request_id"]) and encoder.num_pinned == 0
        with pytest.raises(InvalidRequestError, match="no images and no videos"):
            encoder.encode([])
        with pytest.raises(InvalidRequestError, match="video 0: .*at least temporal_patch_size"):
            encoder.encode(videos=[tiny_video(1)])
        assert encoder.num_pinned == 0 and encoder.staging.free_bytes == encoder.staging.nbytes
        assert not hybrid.has_unfinished_requests()
        assert_pool_full(hybrid)
        assert_receive_region_free(hybrid)
    finally:
        encoder.close()
        hybrid.close()


# ------------------------------------------------------------------ three processes
def test_video_encode_prefill_decode_in_three_processes_match_hybrid(media):
    """Encoder and prefill engines in child processes, the decode engine here: E -> P over
    DLSlime (video and image embeddings), P -> D over DLSlime (KV). Two rounds; the second hits
    the prefill engine's prefix cache past the video through its content hash. Every buffer is
    back afterwards."""
    prompts = cases(media)
    hybrid = local()
    expected = hybrid.generate(prompts, SCORED)
    # the blocks a second run of each prompt can take from the cache: every full block up to the
    # end of its last video token at least
    cacheable = [hybrid.make_request(p).multimodal.visual_end // BLOCK * BLOCK for p in prompts]
    hybrid.close()
    assert min(cacheable) >= 2 * BLOCK
    encoder = encoder_worker()
    prefill = WorkerEngine({"model": MODEL, "role": "prefill", "dtype": "float32", "cache": {"block_size": BLOCK},
                            "scheduler": {"max_model_len": 256}, "transfer": {}, "encoder_cache": STAGING})
    decode = local("decode")
    try:
        for round_ in range(2):
            for prompt, exp, cached in zip(prompts, expected, cacheable):
                ec = encoder.encode(**encode_args(prompt))
                assert [v["num_tokens"] for v in ec["videos"]] == ([45] if "images" in prompt else [32])
                before = prefill.stats()["num_cached_tokens"]
                rid = prefill.add_request(prompt, SCORED, ec_transfer_params=ec)
                first = worker_final(prefill, rid)
                assert first.error is None, first.error
                assert first.finish_reason == "kv_transfer"
                hit = prefill.stats()["num_cached_tokens"] - before
                assert (hit >= cached) if round_ else (hit == 0), f"round {round_}: {hit} cached tokens"
                out = run(decode, prompt, SCORED, kv_transfer_params=first.kv_transfer_params)
                assert_same_output(out, exp, first_elsewhere=True)
        stats = wait_encoder_released(encoder)
        assert stats["released_done"] == 4 and stats["released_timeout"] == 0
        assert stats["videos"] == 4 and stats["video_tokens"] == 2 * (32 + 45) and stats["image_tokens"] == 2 * 16
        assert_pulled(prefill, 4)
        wait_prefill_released(prefill)
        assert_pool_full(decode)
    finally:
        decode.close()
        prefill.close()
        encoder.close()




# ------------------------------------------------------------------ failures


def test_encoder_killed_mid_pull_of_a_video_fails_clearly_and_frees_every_buffer(media):
    """pull_mode="async": the encoder stops while a video's embeddings are being read, then is
    killed. The request ends with finish_reason "error" naming the encoder (well before the pull
    timeout); the KV pool and the receive region are whole (the read failed, so nothing is
    quarantined). With on_pull_failure="local" the same params make the engine encode the video
    itself, giving the hybrid engine's tokens."""
    prompt = cases(media)[0]
    hybrid = local()
    [expected] = [o.token_ids for o in hybrid.generate([prompt], GREEDY)]
    hybrid.close()
    encoder = encoder_worker()
    prefill = local("prefill", pull_mode="async", pull_timeout_s=20.0)
    fallback = local(on_pull_failure="local")
    try:
        # a first pull connects and handshakes, so the next one goes straight to its read
        first = run(prefill, prompt, ec_transfer_params=encoder.encode(**encode_args(prompt)))
        assert first.error is None and first.finish_reason == "kv_transfer"
        ec = encoder.encode(**encode_args(prompt))
        stop_process(encoder.pid)
        t0 = time.monotonic()
        rid = prefill.add_request(prompt, GREEDY, ec_transfer_params=ec)
        pulls = prefill.describe()["ec_pulls"]
        assert pulls["in_flight"] == 1 and pulls["receive_free_bytes"] < pulls["receive_bytes"], "no read in flight"
        encoder.kill()
        finals: dict = {}
        deadline = time.monotonic() + 10
        while rid not in finals:
            assert time.monotonic() < deadline, "the pull did not end after the encoder died"
            finals.update({o.request_id: o for o in prefill.step() if o.finished})
            time.sleep(0.002)
        failed = finals[rid]
        assert time.monotonic() - t0 < 10, "the pull waited for its timeout instead of seeing the dead peer"
        assert failed.finish_reason == "error" and failed.token_ids == []
        assert f"encoder engine {ec['engine_id']}" in failed.error
        assert "unreachable or closed" in failed.error or "dead" in failed.error, failed.error
        assert not prefill.has_unfinished_requests()
        pulls = assert_receive_region_free(prefill)
        assert pulls["failed"] == 1 and pulls["pulled"] == 1
        # the first request's KV is still pinned for a decode engine that never comes: release it
        prefill.abort(first.request_id)
        prefill.step()
        assert_pool_full(prefill)

        out = run(fallback, prompt, ec_transfer_params=ec)
        assert out.error is None and out.token_ids == expected
        assert fallback.describe()["ec_pulls"]["encoded_locally"] == 1
        assert_pool_full(fallback)
        assert_receive_region_free(fallback)
    finally:
        prefill.close()
        fallback.close()
        encoder.close()
