"""`collm-edge`: an edge device's server for cloud-edge collaborative inference (docs/cloud-edge.md).

It loads the base model, keeps layers [0, S) of it (`edge_runtime`), the adapter version the
cluster serves (a folder `collm adapter export` wrote; none: the base model) and an exit head for
that version (a file, or distilled here for a few steps on local text), and serves TGI's
POST /generate on its own port. With `--cloud host:port` every token its exit head is not sure of
goes to that replica's EdgeSession RPC (mutual TLS with `--tls-dir` and an edge certificate); a
replica that does not answer within the latency budget, or cannot be reached, costs the token its
cloud answer and never the request. Decoding is greedy: sampling parameters are ignored, and the
answer says so. The request and response bodies are the agent's (serving/schemas.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from aiohttp import web

from collm_rpc import tls

from ..engine.detokenize import IncrementalDetokenizer
from ..engine.requests import FinalEvent, FinishReason, SamplingParams, TokenInfo, finish_reason, length_error
from ..serving.pipeline import ADAPTER_SHA_HEADER, generation_headers, read_json
from ..serving.schemas import GenerateParameters, InvalidRequest, error_body, generate_body, parse_generate_request, prompt_ids, sampling_params
from .client import CloudClient, LinkSettings, LinkStats
from .collab import STATE_DTYPES, CloudLink, CollabResult, NoCloud, generate
from .split import EdgePartition

log = logging.getLogger(__name__)

ROUTES_HEADER = "x-collm-edge-tokens"  # "edge=12 cloud=7 standalone=1": who chose the tokens of the answer
GREEDY_NOTE = "collm-edge decodes greedily: do_sample, temperature, top_k, top_p, repetition_penalty and seed are ignored"
PREFILL_NOTE = "collm-edge computes no prompt logprobs: details.prefill is empty"


def ignored_parameters(p: GenerateParameters, params: SamplingParams) -> list[str]:
    """What the answer must say this server did not honour (the request is served all the same)."""
    notes = []
    if params.sampling or p.repetition_penalty not in (None, 1.0) or p.seed is not None:
        notes.append(GREEDY_NOTE)
    if p.decoder_input_details:
        notes.append(PREFILL_NOTE)
    return notes


@dataclass
class Completion:
    final: FinalEvent
    result: CollabResult
    link: LinkStats | None


class EdgeServer:
    """The edge partition behind TGI's POST /generate; one generation at a time per `concurrency` slot."""

    def __init__(
        self,
        edge: EdgePartition,
        tokenizer,
        *,
        eos_token_ids: Collection[int],
        bos_token_id: int | None,
        threshold: float,
        state_dtype: str = "fp16",
        max_total_tokens: int = 1024,
        cloud: CloudClient | None = None,
        concurrency: int = 1,
    ) -> None:
        self.edge, self.tokenizer, self.cloud = edge, tokenizer, cloud
        self.eos_token_ids, self.bos_token_id = frozenset(eos_token_ids), bos_token_id
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.threshold, self.state_dtype, self.max_total_tokens = threshold, state_dtype, max_total_tokens
        self._slots = asyncio.Semaphore(concurrency)

    def complete(self, ids: Sequence[int], params: SamplingParams) -> Completion:
        """Greedy collaborative decoding of one request, stopped as the engine stops (EOS, stop
        sequences, length); blocking."""
        detok = IncrementalDetokenizer(self.tokenizer, list(ids))
        tokens: list[TokenInfo] = []
        reasons: list[FinishReason] = []

        def until(token: int) -> bool:
            special = token in self.eos_token_ids or token in self.special_ids
            delta = "" if special else detok.add(token)
            reason = finish_reason(
                params,
                token,
                delta,
                detok.text,
                eos_token_ids=self.eos_token_ids,
                generated=len(tokens),
                context=len(ids) + len(tokens),
                max_total_tokens=self.max_total_tokens,
            )
            if reason is not None:
                delta += detok.flush()
                reasons.append(reason)
            tokens.append(TokenInfo(token, delta, None, special))
            return reason is not None

        link = self.cloud.link(len(ids) + params.max_new_tokens) if self.cloud is not None else None
        started = time.perf_counter()
        try:
            cloud: CloudLink = link if link is not None else NoCloud()
            result = generate(self.edge, cloud, ids, max_new_tokens=params.max_new_tokens, threshold=self.threshold, state_dtype=self.state_dtype, until=until)
        finally:
            if link is not None:
                link.close()
        elapsed = time.perf_counter() - started
        final = FinalEvent(
            finish_reason=reasons[0] if reasons else FinishReason.LENGTH,
            generated_text=detok.text,
            generated_tokens=len(tokens),
            seed=None,
            adapter_version=link.stats.adapter_version if link is not None else None,
            prompt_tokens=len(ids),
            tokens=tuple(tokens),
            tpot_s=elapsed / len(tokens) if tokens else None,
            adapter_sha256=self.edge.adapter.sha256,
        )
        return Completion(final, result, link.stats if link is not None else None)

    async def generate(self, request: web.Request) -> web.Response:
        try:
            req = parse_generate_request(await read_json(request, example='{"inputs": "..."}', error=_BodyError), stream=False)
            ids = prompt_ids(self.tokenizer.encode(req.inputs), req.params.truncate, self.bos_token_id)
            params = sampling_params(req.params, len(ids), self.max_total_tokens)
            error = length_error(len(ids), params.max_new_tokens, self.max_total_tokens)
            if error is not None:
                raise InvalidRequest(error)
        except InvalidRequest as exc:
            return web.json_response(error_body(str(exc), "validation"), status=422)
        except _BodyError as exc:
            return web.json_response(error_body(exc.message, "validation"), status=exc.status)
        async with self._slots:
            done = await asyncio.to_thread(self.complete, ids, params)
        body = generate_body(done.final, details=req.params.details, prefix=req.inputs if req.params.return_full_text else "")
        notes = ignored_parameters(req.params, params)
        if notes:
            body["warnings"] = notes
        r = done.result
        headers = {
            **generation_headers(done.final),
            ADAPTER_SHA_HEADER: self.edge.adapter.sha256,
            ROUTES_HEADER: f"edge={r.routes.count('edge')} cloud={r.cloud_tokens} standalone={r.standalone_tokens}",
        }
        return web.json_response(body, headers=headers)

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "split": self.edge.split, "adapter_sha256": self.edge.adapter.sha256, "cloud": self.cloud is not None})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", self.health)
        return app


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collm-edge",
        description="An edge device's server: the first layers of the model and an exit head serve TGI's POST /generate; "
        "tokens the head is not sure of go to a replica's EdgeSession RPC (--cloud).",
    )
    parser.add_argument("--model", default="tiny", help="base model, as collm-agent takes it (tiny, smollm2, a HF directory or a .gguf file)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16, float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--split", type=int, required=True, help="S: the edge runs layers [0, S), the replica the rest")
    parser.add_argument("--adapter", help="the adapter version the replica serves: a folder `collm adapter export` wrote (default: the base model alone)")
    parser.add_argument("--exit-head", help="an exit head file (safetensors) trained for that split and adapter version")
    parser.add_argument("--train-exit-head-steps", type=int, default=0, help="no --exit-head: distil one here for this many steps on --data")
    parser.add_argument("--data", help="text to distil the exit head on: a .jsonl file, a text file or a folder")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per distillation window (the data needs at least 10 windows)")
    parser.add_argument("--save-exit-head", help="write the distilled exit head to this file")
    parser.add_argument("--threshold", type=float, default=0.8, help="the edge emits its exit head's token when its probability reaches this (above 1: never)")
    parser.add_argument("--state-dtype", default="fp16", choices=sorted(STATE_DTYPES), help="boundary states on the wire")
    parser.add_argument("--cloud", help="the replica's gRPC address, host:port (default: the edge alone)")
    parser.add_argument("--tls-dir", help="mutual TLS towards the replica: ca.crt, tls.crt, tls.key of an edge identity of the replica's cluster")
    parser.add_argument("--latency-budget-ms", type=float, default=200.0, help="the longest a token waits for the replica before the edge emits its own")
    parser.add_argument("--retry-seconds", type=float, default=1.0, help="after the link fails, the edge answers alone this long before it tries again")
    parser.add_argument("--max-total-tokens", type=int, default=1024, help="prompt + generated tokens of one request")
    parser.add_argument("--concurrency", type=int, default=1, help="generations at once")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    parser.add_argument("--port", type=int, default=8090, help="HTTP port")
    parser.add_argument("--log-level", default="INFO")
    return parser


def training_texts(path: str) -> list[str]:
    from ..engine.data import read_examples

    return [e.text if e.text is not None else f"{e.prompt}{e.completion}" for e in read_examples(path)]


def build_server(args: argparse.Namespace) -> EdgeServer:
    """Everything main() serves, from the parsed flags; ValueError says what to fix."""
    from ..engine.llama import LlamaRuntime
    from ..engine.model_host import load_base_model
    from ..federated.export import read_peft
    from .exit_head import ExitHead, train_exit_head
    from .split import PinnedAdapter, edge_runtime

    if not (args.exit_head or (args.train_exit_head_steps > 0 and args.data)):
        raise ValueError("give an exit head: --exit-head FILE, or --train-exit-head-steps N with --data PATH to distil one here")
    credentials = tls.Credentials.read(args.tls_dir) if args.tls_dir else None
    if credentials is not None and credentials.identity.role != tls.EDGE:
        raise ValueError(f"the certificate in {args.tls_dir} is {credentials.identity}'s; replicas accept edge sessions from edge identities only")
    base = load_base_model(args.model, dtype=args.dtype, device=args.device)
    adapter = PinnedAdapter.of(*read_peft(args.adapter)) if args.adapter else PinnedAdapter.base()
    if args.exit_head:
        head = ExitHead.load(args.exit_head, adapter_sha256=adapter.sha256, device=base.device)
    else:
        whole = LlamaRuntime(base.config, base.state_dict)  # the teacher: distillation needs the deep layers once
        log.info("distilling an exit head at layer %d for %d steps on %s", args.split, args.train_exit_head_steps, args.data)
        head = train_exit_head(
            whole, adapter, training_texts(args.data), args.train_exit_head_steps, tokenizer=base.tokenizer, split=args.split, seq_len=args.seq_len
        )
        del whole
        if args.save_exit_head:
            head.save(args.save_exit_head)
    edge = EdgePartition(edge_runtime(base, args.split), args.split, adapter, head)
    cloud = None
    if args.cloud:
        settings = LinkSettings(latency_budget_s=args.latency_budget_ms / 1000, retry_s=args.retry_seconds)
        cloud = CloudClient(args.cloud, model=base.name, split=args.split, adapter_sha256=adapter.sha256, credentials=credentials, settings=settings)
    return EdgeServer(
        edge,
        base.tokenizer,
        eos_token_ids=base.eos_token_ids,
        bos_token_id=base.bos_token_id,
        threshold=args.threshold,
        state_dtype=args.state_dtype,
        max_total_tokens=min(args.max_total_tokens, base.max_context),
        cloud=cloud,
        concurrency=args.concurrency,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build_server(args)
    except ValueError as exc:
        print(f"collm-edge: {exc}", file=sys.stderr)
        return 2
    where = f"with replica {args.cloud}" if args.cloud else "alone (no --cloud)"
    log.info(
        "collm-edge: layers [0, %d) of %s, adapter %s, %s, on http://%s:%d",
        args.split,
        args.model,
        server.edge.adapter.sha256[:12],
        where,
        args.host,
        args.port,
    )
    try:
        web.run_app(server.app(), host=args.host, port=args.port, print=None)
    finally:
        if server.cloud is not None:
            server.cloud.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
