"""generation.backend `graph`: decode over a static KV cache, one step replayed as a CUDA graph.

    decoder = StaticDecoder(model, pad_id, eos_ids)
    new_tokens = decoder.decode(prompts, decoding, cache_len)    # [rows, max_new_tokens], pad after the end

Why a loop of our own: `model.generate` spends a decode step launching kernels from Python (966 new
tokens/s for a 1.5B teacher at 64 prompts on an H200); `generate(cache_implementation="static")`
compiles per shape (~50 s each) and transformers' continuous-batching API was slower than plain
`generate` there (`shared/measurements/README.md`). Prefilling into transformers' `StaticCache` and
replaying one captured decode step (the forward, the warpers, the sampling: one launch per token) made
52,700 new tokens/s on that machine. On CPU the same step runs eagerly, which is how the tests check it
against `generate`.

What stays transformers': the model's forward, `StaticCache`, the causal/padding mask (`sdpa_mask`),
the logits warpers in `generate`'s order (temperature, top-k, top-p) and `generate`'s own sampling
(`multinomial` over the softmax, or `argmax` when greedy; rows that ended emit the pad token). So a
completion has the distribution `generate` gives it. What is ours: the loop, and the attention of a
decode step (`grouped_query_decode_attention` below).

One decoder state (cache, buffers, graphs) is kept per shape: the batches of a stage share it, since
every batch is padded to the same cache length; only a last, smaller batch builds a second one. A decode
step attends over the cache only up to the next multiple of KEY_BLOCK past the tokens written so far,
not over its whole length (one graph per such length, sharing one memory pool): the keys past it are all
masked, and reading them cost ~25% of the attention time of a 128 + 256 token decode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import (
    AttentionInterface,
    LogitsProcessorList,
    PreTrainedModel,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dist_bench.teacher import sampling
from dist_bench.teacher.interface import Decoding

ATTENTION = "dist_bench_grouped_decode"
WARMUP_STEPS = 2  # eager decode steps on a side stream before capture (cuBLAS workspaces, allocator)
KEY_BLOCK = 64  # a decode step reads the cache up to the next multiple of this past the written tokens
_key_limit: int | None = None  # that length, for the step being run or captured (see key_limit)


@contextmanager
def key_limit(length: int) -> Iterator[None]:
    """Decode steps run inside read only the cache's first `length` slots (a captured step keeps it)."""
    global _key_limit
    _key_limit = length
    try:
        yield
    finally:
        _key_limit = None


CHECK_EVERY = 16  # decode steps between looks at whether every row has ended (each look syncs the host)


def grouped_query_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA, except that a single query token's heads are packed onto the KV head they share.

    transformers' SDPA path repeats the KV cache once per query head whenever a mask is passed (`repeat_kv`;
    versions after 5.17 pack a single query as here, `pack_gqa`). A decode step over a static cache always
    has a mask, so on a 12-head/2-KV-head teacher that copies the whole cache six times per layer per
    token: 9,000 against 32,000 new tokens/s on an H200 (the measurements' probe). Prefill (more than one
    query token) goes to transformers' own function unchanged."""
    batch, heads, q_length, dim = query.shape
    kv_heads = key.shape[1]
    if q_length != 1 or kv_heads == heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is None:  # a static cache's decode step always has one: unwritten slots must be masked
        raise RuntimeError("grouped_query_decode_attention: a decode step over a static cache needs its mask")
    if _key_limit is not None:  # the slots past it are unwritten: masked, so leaving them out changes nothing
        key, value = key[:, :, :_key_limit], value[:, :, :_key_limit]
        attention_mask = attention_mask[..., :_key_limit]
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, KV heads, queries sharing it, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )  # the mask [B, 1, 1, L] broadcasts over the packed heads
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, grouped_query_decode_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def plain_temperature(decoding: Decoding) -> bool:
    """Sampling with no top-k or top-p: on CUDA, sampling.race_sample draws it in one pass."""
    return not decoding.greedy and not decoding.top_k and decoding.top_p >= 1.0


def warpers(decoding: Decoding) -> LogitsProcessorList:
    """The logits warpers `generate` applies when sampling, in its order and under its conditions."""
    chain = LogitsProcessorList()
    if decoding.greedy:
        return chain
    if decoding.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_k:
        chain.append(TopKLogitsWarper(top_k=decoding.top_k, min_tokens_to_keep=1))
    if decoding.top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=decoding.top_p, min_tokens_to_keep=1))
    return chain


@dataclass
class _State:
    """Everything a decode step reads and writes, at fixed addresses, so a captured step can be replayed."""

    key: tuple
    cache: StaticCache
    mask: torch.Tensor  # [rows, cache_len] 1 = a real token (prompt padding 0); future slots masked causally
    tokens: torch.Tensor  # [rows, 1] the token each row feeds next
    positions: torch.Tensor  # [rows, 1] its position id
    step: torch.Tensor  # [1] index of the next new token in `out`
    out: torch.Tensor  # [rows, max_new_tokens] new tokens, pad after a row ended
    unfinished: torch.Tensor  # [rows] bool
    eos: torch.Tensor
    race: bool  # plain temperature sampling on CUDA: sampling.race_sample, keyed by `seed`
    seed: torch.Tensor  # [1] int64, advanced every step
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # by key_limit
    pool: tuple | None = None  # the graphs' shared memory pool: they never run at once
    eager_steps: int = 0  # warm-up steps run so far (CUDA)


class StaticDecoder:
    def __init__(self, model: PreTrainedModel, pad_id: int, eos_ids: set[int]) -> None:
        self.model, self.pad_id, self.eos_ids = model, pad_id, sorted(eos_ids)
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda"  # False: every step eager (CPU; the GPU test's reference)
        self._state: _State | None = None

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], decoding: Decoding, cache_len: int) -> torch.Tensor:
        """Each prompt's `decoding.n` completions (rows prompt-major, like `generate`'s
        num_return_sequences): [rows, max_new_tokens] token ids on the CPU, pad after a row ended.
        `cache_len` >= the longest prompt + max_new_tokens; one value for all batches of a stage lets
        them share one captured graph."""
        rows = [ids for ids in prompts for _ in range(decoding.n)]
        width = max(len(ids) for ids in rows)
        if width + decoding.max_new_tokens > cache_len:
            raise ValueError(
                f"cache_len {cache_len} < prompt {width} + max_new_tokens {decoding.max_new_tokens}"
            )
        previous = self.model.config._attn_implementation
        swap = previous == "sdpa"  # a user's other choice (eager, flash) is left as it is
        if swap:
            self.model.set_attn_implementation(ATTENTION)
        try:
            return self._decode(rows, width, decoding, cache_len)
        finally:
            if swap:
                self.model.set_attn_implementation(previous)

    def _decode(self, rows: list[list[int]], width: int, decoding: Decoding, cache_len: int) -> torch.Tensor:
        state = self._state_for(len(rows), cache_len, decoding)
        chain = warpers(decoding)
        lengths = torch.tensor([len(ids) for ids in rows], device=self.device)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(ids)) + ids for ids in rows], device=self.device
        )
        prompt_mask = (torch.arange(width, device=self.device) >= (width - lengths)[:, None]).long()
        state.mask.fill_(1)
        state.mask[:, :width] = prompt_mask
        state.cache.reset()  # in place: the graph keeps pointing at the same tensors
        state.out.fill_(self.pad_id)
        state.unfinished.fill_(True)
        state.step.zero_()
        if state.race:  # from the batch's seeded CUDA generator (CPU draws would shift generate's stream)
            state.seed.copy_(torch.randint(0, 2**62, (1,), device=self.device))
        state.positions.copy_(lengths[:, None] - 1)  # _advance moves it to the first new token's position
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        logits = self.model(
            input_ids=input_ids, attention_mask=state.mask, position_ids=positions,
            past_key_values=state.cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]  # fmt: skip
        self._advance(state, self._choose(state, logits, chain, decoding))
        for step in range(1, decoding.max_new_tokens):
            if step % CHECK_EVERY == 0 and not bool(state.unfinished.any()):
                break  # every row ended: `generate` stops here too
            written = width + step  # slots this step attends over: the prompt, the tokens so far, its own
            with key_limit(min(cache_len, -(-written // KEY_BLOCK) * KEY_BLOCK)):
                self._run_step(state, chain, decoding)
        return state.out.cpu()

    def _state_for(self, rows: int, cache_len: int, decoding: Decoding) -> _State:
        key = (rows, cache_len, decoding)
        if self._state is not None and self._state.key == key:
            return self._state
        self._state = None  # free the previous shape's cache and graph first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

        def buffer(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        self._state = _State(
            key=key,
            cache=StaticCache(config=self.model.config, max_cache_len=cache_len),
            mask=buffer(rows, cache_len),
            tokens=buffer(rows, 1),
            positions=buffer(rows, 1),
            step=buffer(1),
            out=buffer(rows, decoding.max_new_tokens),
            unfinished=buffer(rows, dtype=torch.bool),
            eos=torch.tensor(self.eos_ids or [-1], device=self.device),
            race=self.device.type == "cuda" and sampling.triton is not None and plain_temperature(decoding),
            seed=buffer(1),
        )
        return self._state

    def _run_step(self, state: _State, chain: LogitsProcessorList, decoding: Decoding) -> None:
        """One decode step: eager off CUDA; on CUDA a few eager steps on a side stream, then the step
        captured once per state and key_limit, and replayed."""
        if not self.capture:
            self._step(state, chain, decoding)
            return
        graph = state.graphs.get(_key_limit)
        if graph is None and state.eager_steps < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(state, chain, decoding)
            torch.cuda.current_stream().wait_stream(side)
            state.eager_steps += 1
            return
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=state.pool):  # recorded, not run: the replay below runs it
                self._step(state, chain, decoding)
            state.graphs[_key_limit], state.pool = graph, state.pool or graph.pool()
        graph.replay()

    def _step(self, state: _State, chain: LogitsProcessorList, decoding: Decoding) -> None:
        logits = self.model(
            input_ids=state.tokens, attention_mask=state.mask, position_ids=state.positions,
            past_key_values=state.cache, use_cache=True,
        ).logits[:, -1]  # fmt: skip
        self._advance(state, self._choose(state, logits, chain, decoding))

    @staticmethod
    def _choose(
        state: _State, logits: torch.Tensor, chain: LogitsProcessorList, decoding: Decoding
    ) -> torch.Tensor:
        """`generate`'s choice of the next token (its `_sample`): argmax, or warp the fp32 logits and draw
        from their softmax (on CUDA without top-k/top-p: the same draw in one pass, sampling.py)."""
        if decoding.greedy:  # upcasting to fp32 first, as generate does, changes no value: the same argmax
            return torch.argmax(logits, dim=-1)
        if state.race:
            return sampling.race_sample(logits, decoding.temperature, state.seed)
        probs = torch.nn.functional.softmax(chain(None, logits.float()), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    def _advance(self, state: _State, chosen: torch.Tensor) -> None:
        """Record the chosen tokens (pad for rows that ended, as `generate` does) and feed them next."""
        chosen = torch.where(state.unfinished, chosen, self.pad_id)
        state.out.index_copy_(1, state.step, chosen[:, None])
        state.unfinished &= ~torch.isin(chosen, state.eos)
        state.tokens.copy_(chosen[:, None])
        state.positions.add_(1)
        state.step.add_(1)
        state.seed.add_(1)  # a new Philox key per step: fresh numbers on every replay
