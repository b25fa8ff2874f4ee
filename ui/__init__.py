"""The Gradio page and its figures: one client of the engine pool's API (`apbv.engine.pool.EnginePool`)."""
