"""The OpenAI-compatible HTTP API (non-streaming) in front of an Engine.

build_api turns each HTTP request into one list of GenerationRequests (one per prompt and
choice), makes one engine.generate call, and shapes the outputs as OpenAI does. It needs no
Ray: the Serve deployment passes its RankGroup as the engine, the unit tests pass a fake.
"""
from __future__ import annotations

import logging
import random
import re
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from deploy.engine import Engine
from deploy.errors import UNAVAILABLE, APIError, error_response, install_error_handlers
from deploy.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    Usage,
    OpenAIRequest,
)
from llama.chat_format import UNSAFE_ERROR, Dialog, encode_dialog, has_special_tags
from llama.request import GenerationOutput, GenerationRequest, SamplingParams
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_CHOICES = 64  # prompts x n in one HTTP request; bounds one engine call
_SEED_MODULUS = 2**63  # per-choice seeds wrap here, so they stay valid int64 and torch seeds
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte-fallback pieces


def build_api(engine: Engine, tokenizer: Tokenizer, model_id: str, max_seq_len: int) -> FastAPI:
    app = FastAPI(title="llama-ray", summary="OpenAI-compatible API for Meta-format Llama checkpoints")
    install_error_handlers(app)  # before the routes: it sets the route class they are built with
    started = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> CompletionResponse:
        _check_model(body.model, model_id)
        # Counted before encoding, so an oversized request costs no tokenizer time.
        single = isinstance(body.prompt, str) or (bool(body.prompt) and isinstance(body.prompt[0], int))
        n_prompts = 1 if single else len(body.prompt)
        if body.n * n_prompts > MAX_CHOICES:
            raise APIError(400, f"This request asks for {body.n * n_prompts} choices ({n_prompts} prompt(s) x "
                                f"n={body.n}); at most {MAX_CHOICES} fit in one request. Lower n or split the "
                                f"prompts across requests.", param="n")
        prompts = _completion_prompts(body.prompt, tokenizer)
        for i, (tokens, _) in enumerate(prompts):
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            _check_length(len(tokens), body.max_tokens, max_seq_len, which, param="prompt")
        want_logprobs = body.logprobs is not None
        requests = [
            GenerationRequest(tuple(tokens), params)
            for tokens, _ in prompts
            for params in _choice_params(body, body.max_tokens, want_logprobs, body.echo)
        ]
        outputs = await _generate(engine, requests)
        choices = []
        for k, out in enumerate(outputs):
            prompt_text = prompts[k // body.n][1]
            choices.append(CompletionChoice(
                index=k,
                text=_echo_text(out, prompt_text, tokenizer) if body.echo else out.text,
                logprobs=_completion_logprobs(out, tokenizer, body.echo, prompt_text) if want_logprobs else None,
                finish_reason=out.finish_reason,
                token_ids=out.token_ids if body.return_token_ids else None,
            ))
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_id, choices=choices,
            usage=_usage(sum(len(t) for t, _ in prompts), outputs),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletionResponse:
        _check_model(body.model, model_id)
        if body.n > MAX_CHOICES:
            raise APIError(400, f"This request asks for {body.n} choices; at most {MAX_CHOICES} fit in one "
                                f"request. Lower n.", param="n")
        dialog: Dialog = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            tokens = encode_dialog(tokenizer, dialog)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_new_tokens()
        if max_tokens is None:
            _check_length(len(tokens), 1, max_seq_len, "the messages", param="messages")
            max_tokens = max_seq_len - len(tokens)  # as many as fit, like the reference's max_gen_len
        else:
            _check_length(len(tokens), max_tokens, max_seq_len, "the messages", param="messages")
        if has_special_tags(dialog):
            # Meta's reference answers such a dialog with a fixed error text instead of running it.
            outputs = [GenerationOutput(tokens, [], UNSAFE_ERROR, "stop", [] if body.logprobs else None)] * body.n
        else:
            params = _choice_params(body, max_tokens, body.logprobs, echo=False)
            outputs = await _generate(engine, [GenerationRequest(tuple(tokens), p) for p in params])
        choices = [
            ChatChoice(
                index=k,
                message=AssistantMessage(content=out.text),
                logprobs=_chat_logprobs(out, tokenizer) if body.logprobs else None,
                finish_reason=out.finish_reason,
                token_ids=out.token_ids if body.return_token_ids else None,
            )
            for k, out in enumerate(outputs)
        ]
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_id, choices=choices,
            usage=_usage(len(tokens), outputs),
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=started)])

    @app.get("/health", response_model=None)
    async def health() -> dict[str, str] | JSONResponse:
        try:
            await engine.check_health()
        except Exception as e:
            # Serve and load balancers poll this; a warning per failed poll is enough.
            logger.warning("health check failed: %s: %s", type(e).__name__, e)
            return error_response(503, f"The model is not ready to serve: {type(e).__name__}: {e}", UNAVAILABLE)
        return {"status": "ok"}

    @app.get("/cluster")
    async def cluster() -> dict:  # whatever the engine reports; the engine keeps it JSON-able
        return await engine.cluster_info()

    return app


# ---- request -> engine ----------------------------------------------------------------------


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"The model `{requested}` does not exist; this server serves `{served}`.",
                       param="model", code="model_not_found")


def _completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer
) -> list[tuple[list[int], str]]:
    """The request's prompt(s) as (token ids, text to echo). Strings get BOS like the reference's
    text_completion; token ids are used as given."""
    if isinstance(prompt, str):
        return [(tokenizer.encode(prompt, bos=True, eos=False), prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty: send a string or at least one token id.", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [(tokenizer.encode(p, bos=True, eos=False), p) for p in prompt]
    token_lists = [prompt] if isinstance(prompt[0], int) else prompt
    out = []
    for i, ids in enumerate(token_lists):
        if not ids:
            raise APIError(400, f"prompt {i} is an empty token list: send at least one token id.", param="prompt")
        bad = [t for t in ids if not 0 <= t < tokenizer.n_words]
        if bad:
            raise APIError(400, f"prompt {i} has token id {bad[0]}; this model's ids are 0..{tokenizer.n_words - 1}.",
                           param="prompt")
        out.append((list(ids), tokenizer.decode(list(ids))))
    return out


def _check_length(prompt_len: int, max_tokens: int, max_seq_len: int, which: str, param: str) -> None:
    """vLLM's wording, which clients already know. A prompt must leave room for one new token."""
    if prompt_len >= max_seq_len:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, {which} is "
                            f"{prompt_len} tokens, which leaves no room for the completion. Please reduce the "
                            f"length of the prompt.", param=param, code="context_length_exceeded")
    if prompt_len + max_tokens > max_seq_len:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in {which}, {max_tokens} for the "
                            f"completion). Please reduce the length of the prompt or of the completion "
                            f"(max_tokens).", param=param, code="context_length_exceeded")


def _echo_text(out: GenerationOutput, prompt_text: str, tokenizer: Tokenizer) -> str:
    """Prompt and generation decoded together, as the reference's echo does (decoding them
    apart would drop the space sentencepiece puts at the start of the first generated word).
    When a stop string cut the text, that cut text is appended to the prompt's."""
    if out.text != tokenizer.decode(out.token_ids):
        return prompt_text + out.text
    return tokenizer.decode([t for t in out.prompt_tokens if t != tokenizer.bos_id] + out.token_ids)


def _choice_params(body: OpenAIRequest, max_tokens: int, logprobs: bool, echo: bool) -> list[SamplingParams]:
    """One SamplingParams per choice. Every sampled choice carries a seed, drawn here when the
    caller gave none: each model-parallel rank then draws the same tokens from its own RNG."""
    if body.seed is not None:
        seeds: list[int | None] = [(body.seed + j) % _SEED_MODULUS for j in range(body.n)]
    elif body.temperature > 0:
        seeds = [random.randrange(2**31) for _ in range(body.n)]
    else:
        seeds = [None] * body.n  # greedy: nothing to draw
    return [
        SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=s,
                       stop=body.stop_strings(), logprobs=logprobs, echo=echo)
        for s in seeds
    ]


async def _generate(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    outputs = await engine.generate(requests)
    assert len(outputs) == len(requests), f"engine returned {len(outputs)} outputs for {len(requests)} requests"
    return outputs


# ---- engine -> response ---------------------------------------------------------------------


def _usage(prompt_tokens: int, outputs: list[GenerationOutput]) -> Usage:
    # Like OpenAI, a prompt counts once however many choices it has.
    completion = sum(len(o.token_ids) for o in outputs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _completion_logprobs(out: GenerationOutput, tokenizer: Tokenizer, echo: bool, prompt_text: str) -> CompletionLogprobs:
    """Pieces decoded one token at a time (the reference's "tokens"); offsets add up piece
    lengths from the start of the choice's text, restarting at len(prompt_text) for the
    generation since the pieces of a string prompt need not add up to the string."""
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    tokens: list[str] = []
    logprobs: list[float | None] = []
    offsets: list[int] = []
    if echo:
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_tokens)
        pos = 0
        for k, (t, lp) in enumerate(zip(out.prompt_tokens, out.prompt_logprobs)):
            tokens.append(tokenizer.decode([t]))
            logprobs.append(None if k == 0 else lp)  # nothing predicts the first token
            offsets.append(pos)
            pos += len(tokens[-1])
    pos = len(prompt_text) if echo else 0
    for t, lp in zip(out.token_ids, out.logprobs):
        tokens.append(tokenizer.decode([t]))
        logprobs.append(lp)
        offsets.append(pos)
        pos += len(tokens[-1])
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=None, text_offset=offsets)


def _chat_logprobs(out: GenerationOutput, tokenizer: Tokenizer) -> ChatLogprobs:
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    return ChatLogprobs(content=[
        TokenLogprob(token=tokenizer.decode([t]), logprob=lp, bytes=_token_bytes(tokenizer, t))
        for t, lp in zip(out.token_ids, out.logprobs)
    ])


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The token's own UTF-8 bytes: a byte-fallback piece is one raw byte (its decoded text alone
    is U+FFFD) and a word-initial piece keeps its space, so a client that joins the bytes gets
    the text back (with the leading space that decoding drops)."""
    if token_id in (tokenizer.bos_id, tokenizer.eos_id):
        return []
    piece = tokenizer.id_to_piece(token_id)
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return [int(m.group(1), 16)]
    return list(piece.replace("\u2581", " ").encode("utf-8"))  # U+2581 is sentencepiece's space
