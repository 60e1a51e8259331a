"""`nano chat` and `nano serve`: try a model in the terminal or on a local web page (the library is serve/)."""

from __future__ import annotations

import click

from cli.common import dtype_option, jnp_dtype

threads_option = click.option("--threads", type=int, default=None,
                              help="CPU threads of each LiteRT-LM engine (default: every core).")


def _settings(max_new_tokens, temperature, top_k, top_p, seed):
    from nano.sampling import SamplingConfig
    from serve.engines import Settings

    return Settings(SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p), max_new_tokens=max_new_tokens,
                    seed=seed)


@click.command("chat")
@click.argument("model")
@click.option("--max-new-tokens", default=256, show_default=True, help="Most tokens per answer.")
@click.option("--temperature", default=1.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=None,
              help="Sample among the K most likely tokens (unset: all; the engine then sorts the whole vocabulary "
                   "each step, which slows a 262k vocabulary: 64 is Gemma's usual).")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with mass P.")
@click.option("--seed", default=0, show_default=True)
@click.option("--raw", is_flag=True, help="No turn template: each message continues the text so far.")
@threads_option
@dtype_option
def chat_cmd(model, max_new_tokens, temperature, top_k, top_p, seed, raw, threads, dtype):
    """Talk to MODEL in the terminal, answers streamed as they come, with the time to the first token and tokens/s
    after each. MODEL is a .litertlm (run in the LiteRT-LM engine, as on a phone) or a model directory /
    `gemma3-270m` (run in JAX, as `nano generate`).

    A model directory whose tokenizer has Gemma's turn pieces gets each message wrapped in Gemma's turn template; a
    .litertlm gets the prompt template its bundle declares (nano's declare none: plain continuation); --raw skips
    both. `/reset` starts a new conversation, Ctrl-C stops an answer, Ctrl-D quits.

    \b
    Example:
      nano chat runs/demo/student-int4.litertlm --temperature 0
    """
    from export.runtime import quiet_native_teardown
    from serve.chat import open_chat, run_chat

    quiet_native_teardown()
    try:
        import readline  # noqa: F401 — line editing and history for input()
    except ImportError:
        pass
    chat = open_chat(model, _settings(max_new_tokens, temperature, top_k, top_p, seed), raw=raw, threads=threads,
                     dtype=jnp_dtype(dtype) if not model.endswith(".litertlm") else None)
    try:
        run_chat(chat)
    finally:
        chat.close()


@click.command("serve")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 0.0.0.0 lets other machines in (a phone on the same network): the page "
                   "has no login.")
@click.option("--port", default=8000, show_default=True)
@threads_option
def serve_cmd(artifacts, host, port, threads):
    """A local web page to try ARTIFACTS (.litertlm bundles): pick one, or two side by side (a student beside its
    teacher), send the same prompt to both and watch both answers stream, with time to first token, tokens/s, file
    size, quantization and provenance read from each bundle.

    One LiteRT-LM engine per artifact is loaded at start; requests to one engine queue, and the page chooses only
    among these artifacts, by name (the file name without .litertlm).

    \b
    Example:
      nano serve runs/demo/student-int4.litertlm runs/demo/teacher-int4.litertlm
    """
    from export.runtime import quiet_native_teardown
    from serve.app import serve

    quiet_native_teardown()
    serve(list(artifacts), host=host, port=port, threads=threads)


COMMANDS = (chat_cmd, serve_cmd)
