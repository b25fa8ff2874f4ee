"""One rank's video pipeline (`apbv.engine.video_pipeline`): frames decoded in a background thread and encoded chunk
by chunk give the embeddings of one read of the whole video encoded at once."""

from __future__ import annotations

import pytest
import torch

from apbv.engine.video_pipeline import chunk_frames, decoded_chunks, encode_chunks, prefetched
from apbv.inputs import ProcessorSpec, patchify
from apbv.metrics import MetricsRecorder
from apbv.model.qwen2_5_vl import QwenVLRank
from apbv.video import plan_video, read_video

CPU = torch.device("cpu")


def test_cpu_chunks_are_a_few_temporal_patches_and_gpu_chunks_fill_the_gpu():
    spec = ProcessorSpec()
    size = (532, 952)  # a 1080p frame at qwen-vl-utils' default size for 64 frames: 2,584 pixel rows per patch
    cpu, gpu = chunk_frames(size, spec, CPU), chunk_frames(size, spec, torch.device("cuda", 0))
    assert cpu == 2 * (8_192 // 2_584) and gpu == 2 * (65_536 // 2_584)
    assert chunk_frames((4480, 4480), spec, CPU) == spec.temporal_patch_size  # never less than one temporal patch


@pytest.mark.parametrize("frames_per_chunk", [2, 6, 64])
def test_chunked_encoding_equals_encoding_the_whole_video(tiny_model, example_video, frames_per_chunk):
    rank_model, spec = QwenVLRank(tiny_model), ProcessorSpec()
    plan = plan_video(example_video, num_frames=16)
    metrics = MetricsRecorder(0, CPU)
    chunks = decoded_chunks(example_video, plan, plan.indices, frames_per_chunk, metrics, CPU)
    chunked = encode_chunks(prefetched(chunks), plan.sizes, rank_model, spec, metrics)
    video = read_video(example_video, num_frames=16)
    pixels, grid = patchify(torch.from_numpy(video.frames), spec)
    whole = rank_model.encode_patches(pixels, grid, MetricsRecorder(0, CPU))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)  # frames never attend across temporal patches


def test_nvdec_asked_on_a_cpu_rank_decodes_on_the_cpu_and_says_why(example_video, capfd):
    plan = plan_video(example_video, num_frames=8)
    metrics = MetricsRecorder(0, CPU)
    asked = torch.cat(list(decoded_chunks(example_video, plan, plan.indices, 4, metrics, CPU, decoder="nvdec")))
    cpu = torch.cat(list(decoded_chunks(example_video, plan, plan.indices, 4, MetricsRecorder(0, CPU), CPU)))
    assert torch.equal(asked, cpu) and asked.shape[0] == 8
    assert metrics.counters["nvdec"] == 0
    assert "CPU instead of NVDEC (the rank is not on a GPU)" in capfd.readouterr().err


def test_gop_runs_cut_at_keyframes_into_balanced_runs():
    from apbv.video.nvdec import gop_runs
    from apbv.video.probe import VideoInfo

    # 400 frames, a keyframe every 40; every 5th frame sampled
    info = VideoInfo(400, 24.0, 360, 640, "h264", tuple(range(400)), tuple(range(0, 400, 40)))
    indices = list(range(0, 400, 5))
    for most in (1, 2, 3, 4, 16):
        runs = gop_runs(indices, info, most)
        assert [i for run in runs for i in run] == indices and len(runs) == min(most, 10)
        gops = [{info.keyframe_before(i) for i in run} for run in runs]
        assert all(a.isdisjoint(b) for a, b in zip(gops, gops[1:]))  # a GOP never splits between runs
        sizes = [len(run) for run in runs]
        assert max(sizes) - min(sizes) <= 80 // 10  # within one GOP's frames of each other
    assert gop_runs([3, 3, 7], VideoInfo(10, 24.0, 8, 8, "h264"), 4) == [[3, 3, 7]]  # no packet index: one run


def test_seek_segments_cut_only_where_a_seek_skips_enough_unwanted_frames():
    from apbv.video.decode import RESEEK_MIN_FRAMES, seek_segments
    from apbv.video.probe import VideoInfo

    info = VideoInfo(400, 24.0, 360, 640, "h264", tuple(range(400)), tuple(range(0, 400, 40)))  # GOPs of 40
    for step in (1, 5, 17, 40, 57, 130):
        indices = list(range(3, 400, step))
        segments = seek_segments(indices, info)
        assert [i for seg in segments for i in seg] == indices
        for before, after in zip(segments, segments[1:]):  # a cut: the next segment's keyframe is far enough on
            keyframe = info.keyframe_before(after[0])
            assert keyframe > before[-1] and keyframe - before[-1] - 1 >= RESEEK_MIN_FRAMES
        for seg in segments:  # no cut inside a segment would have been worth it
            for a, b in zip(seg, seg[1:]):
                assert info.keyframe_before(b) - a - 1 < RESEEK_MIN_FRAMES
    assert seek_segments([0, 399], VideoInfo(400, 24.0, 8, 8, "h264")) == [[0, 399]]  # no packet index


class _IndexedDecoder:
    """PyNvVideoCodec's SimpleDecoder as `_decode_forward` uses it (seek_to_index, then get_batch_frames forward),
    over frames in memory; counts the frames it decodes, from the keyframe before each seek on."""

    def __init__(self, frames, info):
        self.frames, self.info, self.position, self.decoded = frames, info, 0, 0

    def seek_to_index(self, index):
        keyframe = self.info.keyframe_before(index)
        self.decoded += index - self.info.frame_pts.index(keyframe)  # decoded up to the index, not returned
        self.position = index

    def get_batch_frames(self, n):
        batch = self.frames[self.position : self.position + n]
        self.position += len(batch)
        self.decoded += len(batch)
        return list(batch)


def test_nvdec_runs_give_the_wanted_frames_and_skip_unwanted_gops():
    from apbv.video import nvdec
    from apbv.video.probe import VideoInfo

    info = VideoInfo(400, 24.0, 2, 2, "h264", tuple(range(400)), tuple(range(0, 400, 40)))
    frames = [torch.full((2, 2, 3), i % 251, dtype=torch.uint8) for i in range(400)]
    indices = [5, 5, 50, 130, 131, 260, 399]
    decoder = _IndexedDecoder(frames, info)
    got = nvdec._decode_forward(decoder, indices, info)
    assert [int(f[0, 0, 0]) for f in got] == [i % 251 for i in indices]
    assert decoder.decoded < 400 - 5  # forward decoding from frame 5 to the end would decode 395
    short = nvdec._decode_forward(_IndexedDecoder(frames[:140], info), [10, 135, 139, 300, 350], info)
    assert [int(f[0, 0, 0]) for f in short] == [10, 135, 139, 139, 139]  # past the end: the last frame stands in


def test_frames_nvdec_did_not_give_come_from_the_cpu_decoder(example_video, capfd):
    """NVDEC failing part way (a profile it lacks, no free session): the CPU decoder gives the rest, so the rank
    still gets every frame once, in order."""
    from apbv.engine.video_pipeline import _finished_on_cpu
    from apbv.errors import VideoUnreadable

    plan = plan_video(example_video, num_frames=12)
    cpu = list(decoded_chunks(example_video, plan, plan.indices, 4, MetricsRecorder(0, CPU), CPU))

    def failing_after_one_batch():
        yield cpu[0]
        raise VideoUnreadable("NVDEC could not decode frames 4-7: test")

    got = list(_finished_on_cpu(failing_after_one_batch(), example_video, plan, plan.indices, 4, pin=False))
    assert torch.equal(torch.cat(got), torch.cat(cpu))
    assert "NVDEC could not decode frames 4-7" in capfd.readouterr().err


def test_an_unknown_video_decoder_is_refused_where_the_options_are_made():
    from apbv.engine.protocol import WorkerOptions
    from apbv.engine.video_pipeline import VideoReading

    for make in (lambda: WorkerOptions(video_decoder="gpu"), lambda: VideoReading(decoder="gpu")):
        with pytest.raises(ValueError, match="video decoder must be one of cpu, nvdec, not 'gpu'"):
            make()
    assert WorkerOptions(video_decoder="nvdec").as_args()[-1] == "--video-decoder=nvdec"
