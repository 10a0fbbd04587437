"""A real inference engine on any machine: llama.cpp's own C++ HTTP server (the `xllamacpp`
wheel) loading a tiny random-weight llama model that `gguf` writes in well under a second.

No weights can be downloaded, so the model is made: its output is random text, but its
compute, its KV cache and its prefix caching are real, and it reports them the way
production engines do (`usage.prompt_tokens_details.cached_tokens`, `timings`, `/metrics`).
The tests and `demo --engine llamacpp` start one server per child process
(`python -m affinity_node.sim.llamacpp serve --model FILE --port P`), so killing one is a
real kill and several run side by side, one thread each.

`xllamacpp`, `gguf` and numpy come with the dev extra; they are imported only when used, so
the shipped simulator runs without them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from affinity_node.sim.support import Child, Processes, free_port, wait_http_ok

MODEL_NAME = "tiny-llama"
HTTP_THREADS = 32
"""Connections llama.cpp serves at once (see `serve`): nodes x 2 and the requests in flight."""
"""The id each server lists on /v1/models (its alias), whatever the file is called."""

SEED = 28
"""Weights from a fixed seed: every run makes the same file, so figures compare."""


# -- the tiny model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModel:
    """The shape: ~1.5M parameters, 6 MB in f32. Small enough to prefill ~7k tokens/s on one
    thread, so thousands-of-tokens prompts cost hundreds of milliseconds: caching shows."""

    vocab: int = 384
    layers: int = 2
    embedding: int = 256
    feed_forward: int = 512
    heads: int = 4
    context: int = 4096


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML, which llama.cpp recognises with or without its Jinja engine."""

_SPECIAL = ("<unk>", "<s>", "</s>")
_BIGRAMS = [
    pair  # the commonest English letter pairs, two characters each
    for line in (
        "thheineranreonatenndtiesorteofedisitalarsttontngsehaasouio",
        "levecomedehiriroicneearacelichllbemasiomur",
    )
    for pair in (line[i : i + 2] for i in range(0, len(line), 2))
]


def _vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style pieces with byte fallback: every text tokenizes; common letters,
    word starts and bigrams make English prompts ~0.7 tokens per character, like real tokenizers."""
    from gguf import TokenType

    pieces: list[tuple[str, int]] = [(t, TokenType.CONTROL) for t in _SPECIAL]
    pieces[0] = ("<unk>", TokenType.UNKNOWN)
    pieces += [(f"<0x{b:02X}>", TokenType.BYTE) for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    normal = ["\u2581", *letters, *(f"\u2581{c}" for c in letters), *"0123456789.,!?:;'-()/"]
    normal += _BIGRAMS + [f"\u2581{b}" for b in _BIGRAMS]
    room = size - len(pieces)
    pieces += [(p, TokenType.NORMAL) for p in normal[:room]]
    pieces += [(f"<unused{i}>", TokenType.UNUSED) for i in range(size - len(pieces))]
    # SentencePiece merges the best-scored pair first: longer pieces win, then earlier ones.
    scores = [
        1000.0 * len(p) - i if kind == TokenType.NORMAL else 0.0
        for i, (p, kind) in enumerate(pieces)
    ]
    return [p for p, _ in pieces], scores, [int(k) for _, k in pieces]


def make_tiny_model(path: Path, seed: int = SEED, shape: TinyModel = TinyModel()) -> Path:
    """Writes a random-weight llama GGUF to `path` (deterministic for a seed) and returns it."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    n, ff = shape.embedding, shape.feed_forward

    def weight(*dims: int) -> Any:
        return (rng.standard_normal(dims) / np.sqrt(dims[-1])).astype(np.float32)

    tokens, scores, types = _vocabulary(shape.vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(n)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.heads)
    writer.add_rope_dimension_count(n // shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", weight(shape.vocab, n))
    writer.add_tensor("output_norm.weight", np.ones(n, dtype=np.float32))
    writer.add_tensor("output.weight", weight(shape.vocab, n))
    for i in range(shape.layers):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", np.ones(n, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}{name}.weight", weight(n, n))
        writer.add_tensor(blk + "ffn_norm.weight", np.ones(n, dtype=np.float32))
        writer.add_tensor(blk + "ffn_gate.weight", weight(ff, n))
        writer.add_tensor(blk + "ffn_up.weight", weight(ff, n))
        writer.add_tensor(blk + "ffn_down.weight", weight(n, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)  # readers never see a half-written file
    return path


# -- one server in this process ----------------------------------------------------------------


@dataclass(frozen=True)
class ServerOptions:
    model: Path
    port: int
    host: str = "127.0.0.1"
    slots: int = 1
    context: int = 4096
    threads: int = 1
    cache_ram_mib: int = -1
    """llama.cpp's host-RAM prompt cache beyond the slots (-1: its default, 0: off)."""
    backend_id: str | None = None
    """When set, answers carry `x-backend-id` (as the vLLM simulator's do), so the demo can
    tell which engine served: llama.cpp then listens on a private port behind a relay in
    this process. llama.cpp itself sends no such header, and the same `system_fingerprint`
    from every instance."""


def serve_forever(opts: ServerOptions) -> None:
    """Runs llama.cpp's HTTP server (its own C++ threads) until SIGTERM or SIGINT."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(opts.model)
    params.model_alias = {MODEL_NAME}
    params.hostnames = [opts.host]
    params.port = opts.port if opts.backend_id is None else free_port()
    params.n_parallel = opts.slots
    params.n_ctx = opts.context * opts.slots  # each slot holds a whole context
    params.cpuparams.n_threads = opts.threads
    params.cpuparams_batch.n_threads = opts.threads
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.warmup = False
    # llama.cpp's HTTP server keeps one thread per open connection, max(slots + 2, cores - 1)
    # of them by default: the idle keep-alive connections of a few nodes' health checks and
    # load polls took them all, and a request waited for one to time out (5 s each, a first
    # request timing out at 30 s now and then). Every node holds about two.
    params.n_threads_http = HTTP_THREADS
    if opts.cache_ram_mib >= 0:
        params.cache_ram_mib = opts.cache_ram_mib
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server's threads exist
    server = xllamacpp.Server(params)
    print(f"llama.cpp serving {opts.model} at {server.listening_address}", flush=True)
    if opts.backend_id is not None:
        engine = f"http://{opts.host}:{params.port}"
        relay = threading.Thread(
            target=asyncio.run,
            args=(_relay(opts.host, opts.port, engine, opts.backend_id),),
            name="relay",
            daemon=True,
        )
        relay.start()
    signal.sigwait(stop)
    # Nothing to flush: leave at once, not after the server's threads wind down (~1.5 s).
    os._exit(0)


_RELAYED_HEADERS = frozenset({"content-type", "accept", "authorization"})


async def _relay(host: str, port: int, engine: str, backend_id: str) -> None:
    """Passes every request to the engine and its answer back as it comes (SSE included),
    adding `x-backend-id`. Runs until the process exits; a client that leaves cancels the
    engine's request (its connection is closed)."""
    from aiohttp import web

    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600), auto_decompress=False
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _RELAYED_HEADERS}
        async with session.request(
            request.method, engine + request.path_qs, data=await request.read(), headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Content-Length", "Cache-Control"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            response.headers["x-backend-id"] = backend_id
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await asyncio.Event().wait()


# -- starting servers as child processes -------------------------------------------------------


@dataclass(frozen=True)
class EngineProcess:
    """One llama.cpp server running in a child process."""

    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_server(
    processes: Processes,
    session: aiohttp.ClientSession,
    name: str,
    model: Path,
    port: int,
    slots: int = 1,
    cache_ram_mib: int = -1,
    backend_id: str | None = None,
) -> EngineProcess:
    """Starts one server and waits until /health says the model is loaded."""
    argv = [
        sys.executable,
        "-m",
        "affinity_node.sim.llamacpp",
        "serve",
        f"--model={model}",
        f"--port={port}",
        f"--slots={slots}",
        f"--cache-ram-mib={cache_ram_mib}",
    ]
    if backend_id is not None:
        argv.append(f"--backend-id={backend_id}")
    child = await processes.start(name, argv)
    engine = EngineProcess(child, port)
    await wait_http_ok(session, f"{engine.url}/health", child, f"{name} (llama.cpp) to load")
    return engine


async def start_servers(
    processes: Processes, model: Path, ports: Sequence[int], slots: int = 1
) -> list[EngineProcess]:
    """Several servers at once (each loads in well under a second)."""
    async with aiohttp.ClientSession() as session:
        return list(
            await asyncio.gather(
                *(
                    start_server(processes, session, f"llamacpp-{i}", model, port, slots)
                    for i, port in enumerate(ports)
                )
            )
        )


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m affinity_node.sim.llamacpp")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model", help="write the tiny random-weight model")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=SEED)
    run = sub.add_parser("serve", help="run one llama.cpp server until SIGTERM")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--slots", type=int, default=1)
    run.add_argument("--context", type=int, default=4096)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--cache-ram-mib", type=int, default=-1)
    run.add_argument(
        "--backend-id", help="answer with this x-backend-id (through a relay in this process)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "make-model":
        print(make_tiny_model(args.out, args.seed))
        return
    serve_forever(
        ServerOptions(
            model=args.model,
            port=args.port,
            host=args.host,
            slots=args.slots,
            context=args.context,
            threads=args.threads,
            cache_ram_mib=args.cache_ram_mib,
            backend_id=args.backend_id,
        )
    )


if __name__ == "__main__":
    main()
