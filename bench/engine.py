"""The LiteRT-LM engine's own benchmark, timed warm: what `nano bench --backend litert-lm` reports."""

from __future__ import annotations

from pathlib import Path

from nano.errors import NanoError


def engine_benchmark(path: Path, threads: int, prefill_tokens: int, decode_tokens: int, cache: Path,
                     context: int | None = None, runs: int = 2) -> list:
    """`litert_lm.Benchmark`, but `runs` generations in one loaded engine, each in its own session: their
    BenchmarkInfo, the last being the figure. The first generation after a load prefills ~20% slower (measured: it
    first touches the engine's buffers, 5,921 page faults against 104 in the second), and llama.cpp, like
    llama-bench, is timed after a warm-up (bench.peer): one cold generation, which `litert_lm.Benchmark` runs,
    would not compare like with like. The engine's benchmark settings (a prompt of `prefill_tokens` tokens, exactly
    `decode_tokens` decoded) are reachable only through its C API, as `litert_lm.Benchmark.run` reaches them
    (litert-lm is pinned)."""
    import ctypes

    import litert_lm
    from litert_lm import interfaces
    from litert_lm._ffi import InputDataType, _get_lib

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    lib = _get_lib()
    settings = lib.litert_lm_engine_settings_create(str(path), "cpu", None, None)
    if not settings:
        raise NanoError(f"the LiteRT-LM engine cannot read {path}")
    lib.litert_lm_engine_settings_enable_benchmark(settings)
    lib.litert_lm_engine_settings_set_num_threads(settings, threads)
    if context is not None:
        lib.litert_lm_engine_settings_set_max_num_tokens(settings, context)
    lib.litert_lm_engine_settings_set_num_prefill_tokens(settings, prefill_tokens)
    lib.litert_lm_engine_settings_set_num_decode_tokens(settings, decode_tokens)
    lib.litert_lm_engine_settings_set_cache_dir(settings, str(cache))
    engine = lib.litert_lm_engine_create(settings)
    lib.litert_lm_engine_settings_delete(settings)
    if not engine:
        raise NanoError(f"the LiteRT-LM engine failed to load {path}")
    infos = []
    try:
        for _ in range(runs):
            session = lib.litert_lm_engine_create_session(engine, None)
            if not session:
                raise NanoError(f"the LiteRT-LM engine failed to start a session on {path}")
            prompt = b"benchmark"  # replaced by the engine's own prompt of `prefill_tokens` tokens
            data = lib.litert_lm_input_data_create(InputDataType.TEXT, prompt, len(prompt))
            try:
                responses = lib.litert_lm_session_generate_content(session, (ctypes.c_void_p * 1)(data), 1)
                if responses:
                    lib.litert_lm_responses_delete(responses)
                info = lib.litert_lm_session_get_benchmark_info(session)
                if not info:
                    raise NanoError(f"the LiteRT-LM engine measured nothing on {path}")
                infos.append(interfaces.create_benchmark_info(lib, info))
                lib.litert_lm_benchmark_info_delete(info)
            finally:
                lib.litert_lm_input_data_delete(data)
                lib.litert_lm_session_delete(session)
    finally:
        lib.litert_lm_engine_delete(engine)
    return infos
