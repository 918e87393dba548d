"""The OpenAI-compatible HTTP API in front of an EngineClient.

build_api turns each HTTP request into one GenerationRequest per prompt and choice, opens an
engine stream for each (deploy/choice_streams.py) and shapes every choice with one
ChoiceShaper (deploy/choices.py): whole, or chunk by chunk with stream=true (deploy/sse.py).
Beside OpenAI's routes, vLLM's /tokenize, /detokenize and /tokenizer_info (deploy/tokenization.py).
It needs no Ray: the Serve deployment passes its RankGroup as the engine, the unit tests a fake.
"""
from __future__ import annotations

import logging
import random
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cluster.errors import GangStartingError
from deploy.choice_streams import ChoiceStreams
from deploy.choices import ChoiceShaper, ChoiceSpec, Echo, Piece, total_usage
from deploy.engine_client import EngineClient
from deploy.errors import RETRY_AFTER_S, UNAVAILABLE, APIError, error_response, install_error_handlers
from deploy.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from deploy.schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from deploy.sse import EventStream, StreamSpec, chat_stream, completion_stream
from deploy.tool_schemas import FunctionCall, ToolCall
from deploy.tools import ToolUse, capabilities, tool_use
from deploy.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    bad_words_token_ids,
    chat_prompt,
    check_token_ids,
    detokenize,
    tokenize,
    tokenizer_info,
)
from llama.engine.grammar import Grammar, check_grammar
from llama.engine.request import GenerationRequest, SamplingParams, StreamDelta
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import UNSAFE_ERROR, has_special_tags

logger = logging.getLogger(__name__)

MAX_CHOICES = 64  # prompts x n in one HTTP request; bounds the engine streams one request opens
# The answers besides a route's 200, as the OpenAPI document states them ("4XX" also stands in for
# FastAPI's default 422, which this app never sends: deploy/errors.py answers validation with 400).
ERRORS = {
    "4XX": {"model": ErrorResponse, "description": "Refused: 400 (the message says what to change), 401 (API "
                                                  "key), 404 (model), 405, 429 (busy: Retry-After)"},
    "5XX": {"model": ErrorResponse, "description": "503 (the model is starting or its workers failed: retry), "
                                                  "504 (past the request timeout), 500 (a server error)"},
}
STREAM = {200: {"content": {"text/event-stream": {"schema": {  # one server-sent event
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "stream=true: a chunk's JSON; [DONE] last"}}}}}}}
_SEED_MODULUS = 2**63  # per-choice seeds wrap here, so they stay valid int64 and torch seeds


def build_api(engine: EngineClient, tokenizer: Tokenizer, model_id: str, max_seq_len: int) -> FastAPI:
    app = FastAPI(title="llama-ray", summary="OpenAI-compatible API for Llama checkpoints")
    install_error_handlers(app)  # before the routes: it sets the route class they are built with
    started = int(time.time())

    @app.post("/v1/completions", response_model=CompletionResponse, responses=STREAM | ERRORS)
    async def completions(body: CompletionRequest) -> CompletionResponse | EventStream:
        _check_model(body.model, model_id)
        # Counted before encoding, so an oversized request costs no tokenizer time.
        single = isinstance(body.prompt, str) or (bool(body.prompt) and isinstance(body.prompt[0], int))
        n_prompts = 1 if single else len(body.prompt)
        if body.n * n_prompts > MAX_CHOICES:
            raise APIError(400, f"This request asks for {body.n * n_prompts} choices ({n_prompts} prompt(s) x "
                                f"n={body.n}); at most {MAX_CHOICES} fit in one request. Lower n or split the "
                                f"prompts across requests.", param="n")
        prompts = []
        for tokens, text in _completion_prompts(body.prompt, tokenizer):
            kept = _truncated(tokens, body.truncate_prompt_tokens, max_seq_len)
            prompts.append((kept, text if len(kept) == len(tokens) else tokenizer.decode(kept)))  # echo what ran
        for i, (tokens, _) in enumerate(prompts):
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            _check_length(len(tokens), body.max_tokens, max_seq_len, which, param="prompt")
        params = _choice_params(body, tokenizer, body.max_tokens, body.logprobs, body.echo, body.grammar())
        requests = [GenerationRequest(tuple(tokens), p) for tokens, _ in prompts for p in params]
        spec = ChoiceSpec(chat=False, logprobs=body.logprobs is not None, return_token_ids=body.return_token_ids)
        shapers = [ChoiceShaper(tokenizer, spec, Echo(*prompts[k // body.n]) if body.echo else None, prompt=k // body.n)
                   for k in range(len(requests))]
        cmpl_id, n_prompt_tokens = f"cmpl-{uuid.uuid4().hex}", sum(len(t) for t, _ in prompts)
        streams = await ChoiceStreams.open(engine, requests)
        if body.stream:
            return completion_stream(streams, shapers, _stream_spec(body, cmpl_id, model_id, "POST /v1/completions",
                                                                    n_prompt_tokens))
        choices = [
            CompletionChoice(index=k, text=p.text, logprobs=p.logprobs, finish_reason=p.finish_reason,
                             token_ids=p.token_ids)
            for k, p in enumerate(await _whole(streams, shapers))
        ]
        return CompletionResponse(id=cmpl_id, created=int(time.time()), model=model_id, choices=choices,
                                  usage=total_usage(n_prompt_tokens, shapers))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAM | ERRORS)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletionResponse | EventStream:
        _check_model(body.model, model_id)
        if body.n > MAX_CHOICES:
            raise APIError(400, f"This request asks for {body.n} choices; at most {MAX_CHOICES} fit in one "
                                f"request. Lower n.", param="n")
        tools = tool_use(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer)
        dialog, tokens = chat_prompt(tokenizer, body.messages, tools.tools)
        tokens = _truncated(tokens, body.truncate_prompt_tokens, max_seq_len)
        max_tokens = body.max_new_tokens()
        if max_tokens is None:
            _check_length(len(tokens), 1, max_seq_len, "the messages", param="messages")
            max_tokens = max_seq_len - len(tokens)  # as many as fit, like the reference's max_gen_len
        else:
            _check_length(len(tokens), max_tokens, max_seq_len, "the messages", param="messages")
        # logprobs=true: the chosen tokens' logprobs, and top_logprobs alternatives (none if not given)
        n_alternatives = (body.top_logprobs or 0) if body.logprobs else None
        params = _choice_params(body, tokenizer, max_tokens, n_alternatives, False, _chat_grammar(body, tools))
        requests = [GenerationRequest(tuple(tokens), p) for p in params]
        spec = ChoiceSpec(chat=True, logprobs=body.logprobs, return_token_ids=body.return_token_ids)
        shapers = [ChoiceShaper(tokenizer, spec, tool_calls=tools.parser()) for _ in requests]
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        if has_special_tags(dialog, tokenizer):
            # Meta's reference answers a dialog with special tags with a fixed error text instead of running it.
            no_lp = [] if body.logprobs else None
            streams = ChoiceStreams.finished([StreamDelta([], UNSAFE_ERROR, no_lp, no_lp, "stop")] * body.n)
        else:
            streams = await ChoiceStreams.open(engine, requests)
        if body.stream:
            return chat_stream(streams, shapers, _stream_spec(body, chat_id, model_id, "POST /v1/chat/completions",
                                                              len(tokens)))
        choices = [
            ChatChoice(index=k, message=_assistant_message(p), logprobs=p.logprobs, finish_reason=p.finish_reason,
                       token_ids=p.token_ids)
            for k, p in enumerate(await _whole(streams, shapers))
        ]
        return ChatCompletionResponse(id=chat_id, created=int(time.time()), model=model_id, choices=choices,
                                      usage=total_usage(len(tokens), shapers))

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            _check_model(body.model, model_id)
        return tokenize(body, tokenizer, max_seq_len)

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            _check_model(body.model, model_id)
        return detokenize(body, tokenizer)

    @app.get("/tokenizer_info", responses=ERRORS)
    async def tokenizer_info_route() -> TokenizerInfo:
        return tokenizer_info(tokenizer, max_seq_len)

    @app.get("/v1/models", responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=started, max_model_len=max_seq_len,
                                         capabilities=capabilities(tokenizer))])

    @app.get("/health", response_model=None, responses={503: {"description": "Not ready: starting ({'status': "
                                                               "'starting', 'start': its stage}) or failed (an error)"}})
    async def health() -> dict[str, str] | JSONResponse:
        try:
            await engine.check_health()
        except GangStartingError as e:  # 503 until ready, saying which stage the start is in
            return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                content={"status": "starting", "start": e.progress})
        except Exception as e:
            # Serve and load balancers poll this; a warning per failed poll is enough.
            logger.warning("health check failed: %s: %s", type(e).__name__, e)
            return error_response(503, f"The model is not ready to serve: {type(e).__name__}: {e}", UNAVAILABLE)
        return {"status": "ok"}

    @app.get("/cluster", responses=ERRORS)
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
        check_token_ids(ids, tokenizer, f"prompt {i}", param="prompt")
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


def _truncated(tokens: list[int], keep: int | None, max_seq_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens; -1, the last max_seq_len - 1."""
    if keep is None:
        return tokens
    keep = max_seq_len - 1 if keep == -1 else keep
    return tokens[-keep:]


def _chat_grammar(body: ChatCompletionRequest, tools: ToolUse) -> Grammar | None:
    """The one constraint on a chat's output: its tool calls' (required, named) or the one
    response_format or structured_outputs sets."""
    grammar = body.grammar()
    if tools.grammar is not None and grammar is not None:
        which = body.tool_choice if isinstance(body.tool_choice, str) else "naming a function"
        raise APIError(400, f"tool_choice {which} makes the answer tool calls, and this request also constrains it "
                            f"with response_format or structured outputs: send one of them (or tool_choice auto).",
                       param="tool_choice")
    return tools.grammar or grammar


def _assistant_message(p: Piece) -> AssistantMessage:
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
             for c in p.tool_calls]
    return AssistantMessage(content=p.text if p.text or not calls else None, tool_calls=calls)


def _choice_params(body: OpenAIRequest, tokenizer: Tokenizer, max_tokens: int, logprobs: int | None,
                   echo: bool, grammar: Grammar | None) -> list[SamplingParams]:
    """One SamplingParams per choice. Every sampled choice carries a seed, drawn here when the
    caller gave none: each model-parallel rank then draws the same tokens from its own RNG.
    `logprobs`: None for none, else how many alternatives per token (SamplingParams.logprobs).
    Token ids the caller names are checked against the vocabulary here, bad_words encoded."""
    check_token_ids([t for t, _ in body.logit_bias_pairs()], tokenizer, "logit_bias", param="logit_bias")
    check_token_ids(body.stop_token_ids, tokenizer, "stop_token_ids", param="stop_token_ids")
    check_token_ids(body.allowed_token_ids or [], tokenizer, "allowed_token_ids", param="allowed_token_ids")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) is more than the tokens this request may generate "
                            f"({max_tokens}); lower min_tokens or raise max_tokens.", param="min_tokens")
    bad_words = bad_words_token_ids(body.bad_words, tokenizer)
    if grammar is not None:
        check_grammar(grammar)  # what the grammar library refuses, as a 400, before any rank sees it
    if body.seed is not None:
        seeds: list[int | None] = [(body.seed + j) % _SEED_MODULUS for j in range(body.n)]
    elif body.temperature > 0:
        seeds = [random.randrange(2**31) for _ in range(body.n)]
    else:
        seeds = [None] * body.n  # greedy: nothing to draw
    return [
        SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                       seed=s, stop=body.stop_strings(), logprobs=logprobs, echo=echo,
                       presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                       logit_bias=body.logit_bias_pairs(), min_p=body.min_p,
                       repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
                       ignore_eos=body.ignore_eos, stop_token_ids=tuple(body.stop_token_ids),
                       allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
                       bad_words=bad_words, include_stop_str_in_output=body.include_stop_str_in_output,
                       skip_special_tokens=body.skip_special_tokens, grammar=grammar)
        for s in seeds
    ]


async def _whole(streams: ChoiceStreams, shapers: list[ChoiceShaper]) -> list[Piece]:
    """Each choice whole: all its deltas, shaped as one piece."""
    return [shaper.whole(deltas) for shaper, deltas in zip(shapers, await streams.collect(), strict=True)]


def _stream_spec(body: OpenAIRequest, id: str, model_id: str, where: str, prompt_tokens: int) -> StreamSpec:
    return StreamSpec(id=id, created=int(time.time()), model=model_id, where=where, prompt_tokens=prompt_tokens,
                      include_usage=body.stream_options is not None and body.stream_options.include_usage)
