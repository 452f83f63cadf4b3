#!/usr/bin/env python3
"""PyTorch peers of kvtier's GPU attention, on the inputs of `kvtier bench gpu`.

Decode: Llama-3.1-8B layer (32 q heads, 8 KV heads, head dim 128, chunk 64);
per (sequence, KV head) a hot set of 130 blocks of 64 tokens (2 sink + 64
window + 64 selected) scattered in a slot arena of >= 2 GiB, batch 1, 4, 16.
  sdpa_pregathered  SDPA over the hot set already gathered into contiguous
                    [batch, kv_heads, tokens, dim] tensors (enable_gqa)
  gather_sdpa       index_select of the blocks out of the arena + SDPA
  flex              flex_attention straight over the arena with a BlockMask
Prefill: an 8192-query block over sinks + window + 64 selected blocks + its own
128 chunks (causal), per KV head:
  prefill_sdpa_mask               SDPA, gathered KV, explicit boolean mask
  prefill_sdpa_causal_lower_right SDPA, gathered KV ordered so that a
                                  lower-right causal bias is the same mask
  prefill_flex                    flex_attention over the arena, BlockMask

Each case: CUDA-event time, median of the repeats after warm-up, with L2
flushed before every repeat; GB/s counts the K and V bytes of the hot set
(each block once). Prints one JSON object on stdout; a part that fails is
recorded under "errors" and the rest still runs.
"""
import json
import math
import platform
import sys
import time
import traceback

Q_HEADS, KV_HEADS, HEAD_DIM, CHUNK = 32, 8, 128, 64
GROUP = Q_HEADS // KV_HEADS
SINK_BLOCKS, WINDOW_BLOCKS, SELECTED_BLOCKS = 2, 64, 64
HOT_BLOCKS = SINK_BLOCKS + WINDOW_BLOCKS + SELECTED_BLOCKS  # 130
BATCHES = (1, 4, 16)
PREFILL_QUERIES = 8192
ARENA_BYTES_MIN = 2 << 30
BLOCK_BYTES = 2 * CHUNK * HEAD_DIM * 2  # K and V, bf16: 32 KiB
WARMUP, REPEATS = 3, 20


def emit(obj):
    print(json.dumps(obj, indent=1))
    sys.stdout.flush()


class Bench:
    def __init__(self, torch):
        self.torch = torch
        self.results = []
        self.errors = {}
        self.notes = {}
        # A buffer larger than L2 (50-60 MB on H100/H200), rewritten before
        # every timed repeat so that no repeat reads the previous one's data
        # from L2.
        self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def add(self, name, value, unit):
        self.results.append({"name": name, "value": value, "unit": unit})

    def part(self, name, fn):
        """Runs one optional part; a failure is recorded, not fatal."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none ends the run
            self.errors[name] = f"{type(e).__name__}: {e}".strip()[:2000]
            self.notes.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=4)[-1500:]
        finally:
            self.torch.cuda.synchronize()

    def time_ms(self, fn):
        torch = self.torch
        for _ in range(WARMUP):
            fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        ms = []
        for _ in range(REPEATS):
            self.flush_buf.zero_()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            ms.append(start.elapsed_time(stop))
        ms.sort()
        return ms[len(ms) // 2]

    def timed(self, name, fn, kv_bytes):
        ms = self.time_ms(fn)
        self.add(name + "_us", ms * 1e3, "us")
        self.add(name + "_gbps", kv_bytes / (ms * 1e6), "GB/s")
        return ms


class Arena:
    """Per KV head, a region of slots [slots_per_head, 2, 64, 128] bf16 (K rows
    then V rows, as kvtier stores a block); all heads together >= 2 GiB. One
    region per head lets flex_attention see the arena as K and V tensors of
    shape [1, kv_heads, tokens, dim] without copying (see flex_kv)."""

    def __init__(self, torch):
        self.torch = torch
        self.slots_per_head = math.ceil(ARENA_BYTES_MIN / KV_HEADS / BLOCK_BYTES)
        self.data = torch.randn(KV_HEADS, self.slots_per_head, 2, CHUNK, HEAD_DIM, device="cuda",
                                dtype=torch.bfloat16)
        self.gen = torch.Generator(device="cpu").manual_seed(20261128)

    def bytes(self):
        return self.data.numel() * self.data.element_size()

    def random_slots(self, lists, blocks):
        """[lists, blocks] distinct slot ids (within one head's region), per list."""
        out = []
        for _ in range(lists):
            out.append(self.torch.randperm(self.slots_per_head, generator=self.gen)[:blocks])
        return self.torch.stack(out).to("cuda")

    def gather(self, head_slots):
        """head_slots [batch, kv_heads, blocks] -> K, V [batch, kv_heads, blocks*64, 128]."""
        torch = self.torch
        b, h, n = head_slots.shape
        # Global slot index of (head, slot) in the arena viewed as [heads * slots, 2, 64, 128].
        flat = (torch.arange(h, device="cuda").view(1, h, 1) * self.slots_per_head + head_slots).reshape(-1)
        blocks = self.data.view(-1, 2, CHUNK, HEAD_DIM)
        k = blocks[:, 0].index_select(0, flat).view(b, h, n * CHUNK, HEAD_DIM)
        v = blocks[:, 1].index_select(0, flat).view(b, h, n * CHUNK, HEAD_DIM)
        return k, v

    def flex_kv(self):
        """The arena as flex_attention's K and V, [1, kv_heads, T, 128]: head h's
        region flattened to rows, block s's K rows at [128 s, 128 s + 64). V is
        the same rows shifted by 64, so row j of V is the value of key row j.
        Rows that are V data in K (and K data in V) are never in the mask."""
        rows = self.data.view(KV_HEADS, self.slots_per_head * 2 * CHUNK, HEAD_DIM)
        t = rows.shape[1] - CHUNK
        return rows[:, :t].unsqueeze(0), rows[:, CHUNK:].unsqueeze(0), t


def sdpa(torch, q, k, v, **kw):
    F = torch.nn.functional
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    except TypeError:  # torch < 2.5: no enable_gqa
        return F.scaled_dot_product_attention(q, k.repeat_interleave(GROUP, 1), v.repeat_interleave(GROUP, 1), **kw)


def flex_module(torch):
    from torch.nn.attention import flex_attention as fa  # noqa: F401 - raises where unavailable
    return fa


def block_mask_from_lists(torch, fa, full_lists, partial_lists, q_len, kv_len, q_block, kv_block, mask_mod):
    """A BlockMask from per (batch, q head, q block) lists of kv block indices
    ([B, H, QB, n] int32, -1 padded). Only the listed blocks are read."""
    def counts_and_indices(lists):
        counts = (lists >= 0).sum(-1).to(torch.int32)
        # Listed blocks first in ascending order, padding last.
        big = torch.iinfo(torch.int32).max
        idx = torch.where(lists >= 0, lists, big).sort(-1).values
        idx = torch.where(idx == big, 0, idx).to(torch.int32).contiguous()
        return counts.contiguous(), idx

    # Both index tensors get the same shape: the kernels may address them
    # with one set of strides.
    width = max(full_lists.shape[-1], partial_lists.shape[-1])

    def pad(lists):
        extra = width - lists.shape[-1]
        if extra == 0:
            return lists
        return torch.cat([lists, torch.full((*lists.shape[:-1], extra), -1, device=lists.device, dtype=lists.dtype)], -1)

    kv_num, kv_idx = counts_and_indices(pad(partial_lists))
    full_num, full_idx = counts_and_indices(pad(full_lists))
    kwargs = dict(full_kv_num_blocks=full_num, full_kv_indices=full_idx, BLOCK_SIZE=(q_block, kv_block),
                  mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
    try:
        # Forward only: no transposed (q-block) lists, so the index tensors
        # stay [.., hot blocks] instead of [.., every block of the arena].
        return fa.BlockMask.from_kv_blocks(kv_num, kv_idx, compute_q_blocks=False, **kwargs)
    except TypeError:
        return fa.BlockMask.from_kv_blocks(kv_num, kv_idx, **kwargs)


def compiled_flex(torch, fa):
    return torch.compile(fa.flex_attention, dynamic=False)


def run_flex(torch, flex, q, k, v, block_mask, scale):
    """Tries kernel options until one compiles for 64-token KV blocks."""
    errors = []
    for opts in (None, {"BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 64}):
        try:
            kw = {"block_mask": block_mask, "scale": scale, "enable_gqa": True}
            if opts:
                kw["kernel_options"] = opts
            out = flex(q, k, v, **kw)
            torch.cuda.synchronize()
            return (lambda: flex(q, k, v, **kw)), out, opts
        except Exception as e:  # noqa: BLE001
            errors.append(f"{opts}: {type(e).__name__}: {str(e)[:300]}")
    raise RuntimeError("flex_attention failed with every kernel option: " + " | ".join(errors))


# ---- decode -----------------------------------------------------------------------


def bench_decode(bench, arena, batch):
    torch = bench.torch
    scale = 1.0 / math.sqrt(HEAD_DIM)
    kv_bytes = batch * KV_HEADS * HOT_BLOCKS * BLOCK_BYTES
    slots = arena.random_slots(batch * KV_HEADS, HOT_BLOCKS).view(batch, KV_HEADS, HOT_BLOCKS)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = arena.gather(slots)
    ref = {}

    def pregathered():
        ref["out"] = sdpa(torch, q, k, v, scale=scale)
        bench.timed(f"decode_sdpa_pregathered_b{batch}", lambda: sdpa(torch, q, k, v, scale=scale), kv_bytes)

    def pregathered_backends():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel([backend]):
                    sdpa(torch, q, k, v, scale=scale)
                    bench.timed(f"decode_sdpa_pregathered_{name.split('_')[0].lower()}_b{batch}",
                                lambda: sdpa(torch, q, k, v, scale=scale), kv_bytes)
            except Exception as e:  # noqa: BLE001
                bench.errors[f"decode_sdpa_{name.lower()}_b{batch}"] = f"{type(e).__name__}: {str(e)[:500]}"

    def gather_sdpa():
        def step():
            kk, vv = arena.gather(slots)
            return sdpa(torch, q, kk, vv, scale=scale)
        bench.timed(f"decode_gather_sdpa_b{batch}", step, kv_bytes)

    def flex():
        fa = flex_module(torch)
        kf, vf, t = arena.flex_kv()
        # Block 2 s of head h's rows is slot s's K; list per (b, q head).
        lists = (2 * slots).repeat_interleave(GROUP, 1).unsqueeze(2).to(torch.int32)  # [B, Hq, 1, 130]
        empty = torch.full((batch, Q_HEADS, 1, 1), -1, device="cuda", dtype=torch.int32)
        bm = block_mask_from_lists(torch, fa, lists, empty, 1, t, 128, CHUNK, None)
        fn, out, opts = run_flex(torch, compiled_flex(torch, fa), q, kf, vf, bm, scale)
        bench.notes[f"decode_flex_b{batch}_kernel_options"] = opts
        if "out" in ref:
            bench.add(f"decode_flex_b{batch}_max_abs_diff_vs_sdpa", (out.float() - ref["out"].float()).abs().max().item(),
                      "abs")
        bench.timed(f"decode_flex_b{batch}", fn, kv_bytes)

    bench.part(f"decode_sdpa_pregathered_b{batch}", pregathered)
    bench.part(f"decode_sdpa_backends_b{batch}", pregathered_backends)
    bench.part(f"decode_gather_sdpa_b{batch}", gather_sdpa)
    bench.part(f"decode_flex_b{batch}", flex)


# ---- prefill ----------------------------------------------------------------------


def bench_prefill(bench, arena):
    """One 8192-query block. Per KV head: 130 blocks before it (sinks, window,
    selected: visible to every query) and its own 128 chunks (causal)."""
    torch = bench.torch
    scale = 1.0 / math.sqrt(HEAD_DIM)
    own = PREFILL_QUERIES // CHUNK  # 128
    blocks = HOT_BLOCKS + own
    kv_bytes = KV_HEADS * blocks * BLOCK_BYTES
    slots = arena.random_slots(KV_HEADS, blocks).view(1, KV_HEADS, blocks)  # prefix first, then own chunks in order
    q = torch.randn(1, Q_HEADS, PREFILL_QUERIES, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = arena.gather(slots)  # [1, 8, 16512, 128], own chunks last
    prefix = HOT_BLOCKS * CHUNK
    # Useful FLOPs (QK^T and PV, 2 each per multiply-add) over the keys each
    # query may see: the prefix and its causal part of the own chunks.
    visible = PREFILL_QUERIES * prefix + PREFILL_QUERIES * (PREFILL_QUERIES + 1) // 2
    flops = 4 * HEAD_DIM * Q_HEADS * visible
    ref = {}

    def timed(name, fn):
        ms = bench.timed(name, fn, kv_bytes)
        bench.add(name + "_tflops", flops / (ms * 1e9), "TFLOP/s")

    def sdpa_mask():
        qi = torch.arange(PREFILL_QUERIES, device="cuda").view(-1, 1)
        kj = torch.arange(prefix + PREFILL_QUERIES, device="cuda").view(1, -1)
        mask = (kj < prefix) | (kj - prefix <= qi)  # True: attend
        timed("prefill_sdpa_mask", lambda: sdpa(torch, q, k, v, attn_mask=mask, scale=scale))

    def sdpa_lower_right():
        from torch.nn.attention.bias import causal_lower_right
        bias = causal_lower_right(PREFILL_QUERIES, prefix + PREFILL_QUERIES)
        ref["out"] = sdpa(torch, q, k, v, attn_mask=bias, scale=scale)
        timed("prefill_sdpa_causal_lower_right", lambda: sdpa(torch, q, k, v, attn_mask=bias, scale=scale))

    def flex():
        fa = flex_module(torch)
        kf, vf, t = arena.flex_kv()
        q_block = 128
        qb = PREFILL_QUERIES // q_block
        kv_blocks = 2 * slots[0]  # [8, 258] kv block index of each listed block
        # Own chunk c of head h sits at kv block kv_blocks[h, 130 + c]; the
        # mask_mod needs the reverse map to know a key's position.
        chunk_of_block = torch.full((KV_HEADS, t // CHUNK + 1), -1, device="cuda", dtype=torch.int32)
        chunk_of_block.scatter_(1, kv_blocks[:, HOT_BLOCKS:].long(),
                                torch.arange(own, device="cuda", dtype=torch.int32).expand(KV_HEADS, own).contiguous())

        def mask_mod(b, h, q_idx, kv_idx):
            c = chunk_of_block[h // GROUP, kv_idx // CHUNK]
            return (c < 0) | (c * CHUNK + kv_idx % CHUNK <= q_idx)

        # Per q block i (queries [128 i, 128 i + 128)): own chunks 2i and 2i+1
        # are diagonal (masked), earlier ones and the prefix are full.
        full = torch.full((1, KV_HEADS, qb, blocks), -1, device="cuda", dtype=torch.int32)
        partial = torch.full((1, KV_HEADS, qb, 2), -1, device="cuda", dtype=torch.int32)
        for i in range(qb):
            full[0, :, i, :HOT_BLOCKS + 2 * i] = kv_blocks[:, :HOT_BLOCKS + 2 * i]
            partial[0, :, i, :] = kv_blocks[:, HOT_BLOCKS + 2 * i:HOT_BLOCKS + 2 * i + 2]
        full = full.repeat_interleave(GROUP, 1)
        partial = partial.repeat_interleave(GROUP, 1)
        bm = block_mask_from_lists(torch, fa, full, partial, PREFILL_QUERIES, t, q_block, CHUNK, mask_mod)
        fn, out, opts = run_flex(torch, compiled_flex(torch, fa), q, kf, vf, bm, scale)
        bench.notes["prefill_flex_kernel_options"] = opts
        if "out" in ref:
            bench.add("prefill_flex_max_abs_diff_vs_sdpa", (out.float() - ref["out"].float()).abs().max().item(), "abs")
        timed("prefill_flex", fn)

    bench.part("prefill_sdpa_mask", sdpa_mask)
    bench.part("prefill_sdpa_causal_lower_right", sdpa_lower_right)
    bench.part("prefill_flex", flex)


def main():
    out = {"bench": "peers", "machine": {"python": platform.python_version(), "host": platform.node()}}
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        out["error"] = f"PyTorch is not importable ({type(e).__name__}: {e}); install torch with CUDA support"
        emit(out)
        return 2
    out["machine"]["torch"] = torch.__version__
    out["machine"]["cuda"] = torch.version.cuda
    if not torch.cuda.is_available():
        out["error"] = "torch.cuda.is_available() is False: no GPU or no CUDA build of PyTorch"
        emit(out)
        return 2
    props = torch.cuda.get_device_properties(0)
    out["machine"]["gpu"] = torch.cuda.get_device_name(0)
    out["machine"]["gpu_memory_bytes"] = props.total_memory
    out["machine"]["sms"] = props.multi_processor_count
    torch.manual_seed(0)
    t0 = time.time()
    bench = Bench(torch)
    arena = Arena(torch)
    out["config"] = {
        "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "chunk_tokens": CHUNK,
        "hot_blocks_per_kv_head": HOT_BLOCKS, "batches": list(BATCHES), "prefill_queries": PREFILL_QUERIES,
        "arena_bytes": arena.bytes(), "timing": f"CUDA events, median of {REPEATS} after {WARMUP} warm-up, L2 flushed",
        "gbps": "K and V bytes of the hot set, each block counted once",
    }
    for batch in BATCHES:
        bench_decode(bench, arena, batch)
    bench_prefill(bench, arena)
    bench.add("peer_wall_s", time.time() - t0, "s")
    out["results"] = bench.results
    out["errors"] = bench.errors
    out["notes"] = bench.notes
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
