"""The Gradio 6 page: `ui.layout`'s components wired to `ui.handlers`, plus the named API of `ui.api`.

The page talks to the engine only through the pool's API (`submit` -> events, `cancel`, `health`). Page handlers
are hidden from the API (`api_visibility="private"`); `/ask` and `/compare` are the API. Engine events share the
concurrency id "engine" with room for as many requests as the engine queues, so that requests wait in the
engine's own queue, which reports their position.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Sequence

import gradio as gr

from ui import handlers
from ui.api import Endpoints
from ui.examples import Example
from ui.layout import CSS, SETTINGS, Layout, build_layout
from ui.runner import Pool
from ui.uploads import refuse_url_fetches

__all__ = ["CSS", "build_page"]


def build_page(
    pool: Pool,
    examples: Sequence[Example],
    queue_size: int = 8,
    max_upload_mb: int | None = None,
    delete_uploads_after_s: int | None = None,
) -> gr.Blocks:
    """The whole page, wired to `pool`; `examples` may be empty. delete_uploads_after_s: uploads (and other files
    of this app in Gradio's cache) older than this are deleted, checked every quarter of it; None keeps them
    until the server stops."""
    refuse_url_fetches()
    age = delete_uploads_after_s
    with gr.Blocks(title="APB-V Video QA", delete_cache=(max(1, age // 4), age) if age else None) as demo:
        page = build_layout(pool.health(), examples, max_upload_mb)
        engine = dict(concurrency_id="engine", concurrency_limit=queue_size)
        _wire(demo, page, pool, engine)
        endpoints = Endpoints(pool)
        gr.api(endpoints.ask, api_name="ask", **engine)
        gr.api(endpoints.compare, api_name="compare", **engine)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def _wire(demo: gr.Blocks, page: Layout, pool: Pool, engine: dict) -> None:
    """Every page event, hidden from the API."""
    quick = dict(queue=False, show_progress="hidden")
    long_running = dict(trigger_mode="once", show_progress="hidden", **engine)
    describe = _event(page, partial(handlers.describe, pool), ["video", "sample_by", "frames", "fps", "max_pixels",
                      "runs"], handlers.DESCRIBE_OUTPUTS, **quick)  # fmt: skip
    idle = _event(page, handlers.idle, [], handlers.BUSY_OUTPUTS, **quick)
    gr.on([demo.load, page.engine_timer.tick],
          **_event(page, partial(handlers.engine_status, pool), [], handlers.ENGINE_OUTPUTS, **quick),
          ).then(**describe)  # the estimate needs the engine's pixel bounds  # fmt: skip
    gr.on([page.strategy.change, page.sample_by.change],
          **_event(page, handlers.show_controls, ["strategy", "sample_by"], handlers.CONTROL_OUTPUTS, **quick))
    gr.on([page.video.change, page.sample_by.change, page.frames.change, page.fps.change, page.max_pixels.change],
          **describe)  # fmt: skip
    gr.on([page.video.change, page.clear.click],
          **_event(page, handlers.start_over, [], handlers.START_OVER_OUTPUTS, **quick))
    gr.on([page.stop.click], **_event(page, partial(handlers.stop, pool), ["running"], handlers.STOP_OUTPUTS, **quick))
    ask_inputs = ["video", "question", "messages", "turns", "runs", "estimate", "side_by_side", *SETTINGS]
    gr.on([page.ask.click, page.question.submit],
          **_event(page, partial(handlers.ask, pool), ask_inputs, handlers.ASK_OUTPUTS, **long_running)).then(**idle)
    for button, every in ((page.compare, False), (page.sweep, True)):
        gr.on([button.click], **_event(page, partial(handlers.compare, pool, every=every),
                                       ["last_request", "runs", "estimate"], handlers.COMPARE_OUTPUTS, **long_running),
              ).then(**idle)  # fmt: skip


def _event(page: Layout, fn: Callable, inputs: Sequence[str], outputs: Sequence[str], **kw: Any) -> dict:
    """The arguments of a page event (`gr.on`, `.then`): components by name, hidden from the API."""
    return dict(fn=_by_name(page, fn, outputs), inputs=[page[n] for n in inputs], outputs=[page[n] for n in outputs],
                api_visibility="private", **kw)  # fmt: skip


def _by_name(page: Layout, fn: Callable, outputs: Sequence[str]) -> Callable:
    """`fn` with its updates keyed by component instead of by name (a generator stays one)."""
    components = {name: page[name] for name in outputs}

    def keyed(update: dict) -> dict:
        return {components[name]: value for name, value in update.items()}

    if inspect.isgeneratorfunction(fn):

        def stream(*args: Any) -> Any:
            for update in fn(*args):
                yield keyed(update)

        return stream
    return lambda *args: keyed(fn(*args))
