"""What the pool and rank 0 say to each other: frozen message types and the workers' exit codes.

    pool -> rank 0:  Job | Cancel | Shutdown
    rank 0 -> pool:  Ready (once, when the model is loaded) | EventMessage (every step of every request)

Messages travel pickled over an authenticated `multiprocessing.connection` (the key: APBV_AUTHKEY), so both sides
share these classes and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apbv.engine.api import Event, Request

VIDEO_DECODERS = ("cpu", "nvdec")


def check_video_decoder(name: str) -> None:
    """Raise ValueError unless `name` is one of VIDEO_DECODERS."""
    if name not in VIDEO_DECODERS:
        raise ValueError(f"video decoder must be one of {', '.join(VIDEO_DECODERS)}, not {name!r}")


EXIT_OUT_OF_MEMORY = 75  # a rank that ran out of device memory exits with this code; the pool reports OutOfMemory


@dataclass(frozen=True)
class WorkerOptions:
    """video_cache_mb: memory for encoded videos on each rank's device (0: no cache); ship_videos: ranks > 0 never
    read video paths themselves (nodes without shared storage): rank 0 sends them each file; context_cache_mb:
    memory for conversations' K/V on each rank's device, continued by follow-up questions (0: no cache). The two
    caches are scaled down together where they would hold more than a quarter of a rank's memory left free by
    the model (`apbv.engine.resources.cache_budgets`). video_decoder: "cpu" (FFmpeg: qwen-vl-utils' frames) or
    "nvdec" (the GPU's video engines where they can, `apbv.video.nvdec`)."""

    video_cache_mb: int = 2048
    ship_videos: bool = False
    context_cache_mb: int = 4096
    video_decoder: str = "cpu"

    def __post_init__(self) -> None:
        check_video_decoder(self.video_decoder)

    def as_args(self) -> list[str]:
        """The worker's command-line flags for these options."""
        flags = [f"--video-cache-mb={self.video_cache_mb}", f"--context-cache-mb={self.context_cache_mb}",
                 f"--video-decoder={self.video_decoder}"]  # fmt: skip
        return flags + (["--ship-videos"] if self.ship_videos else [])


@dataclass(frozen=True)
class Job:
    """Run `request`; its events come back tagged with `request_id`."""

    request_id: str
    request: Request


@dataclass(frozen=True)
class Cancel:
    """Stop `request_id` (queued on rank 0: never start it; running: at its next token)."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Every rank leaves its loop and exits."""


@dataclass(frozen=True)
class EngineInfo:
    """What rank 0 reports once its model is loaded: the engine's size, device and model, and the per-frame pixel
    bounds it reads videos with (`ProcessorSpec.read_video_pixels`)."""

    world_size: int
    device: str
    model: str
    video_pixels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Ready:
    info: EngineInfo


@dataclass(frozen=True)
class EventMessage:
    request_id: str
    event: Event


ToEngine = Job | Cancel | Shutdown
FromEngine = Ready | EventMessage
