"""Fused Quiet-STaR thought attention in Triton: forward and backward.

Same contract as the PyTorch reference `quietstar.attention.thought_attention` (imported here as
`thought_attention_ref`): the query of chain step s (absolute step_offset + s) at thinking position i (text position
P + i, P = position_offset) attends to the text keys j <= P + i and to its own position's chain keys
t <= step_offset + s, with one softmax over both.

Layout. Each program owns BLOCK_M query rows of one (batch, thought, query head); a row is a flattened
(position, step) pair, r = i * Sq + s. It runs one online softmax (flash-attention style, fp32 state) over
    (a) text key tiles 0 .. P + max position of its rows (causal block skipping: later tiles are never visited), and
    (b) the contiguous range of chain keys of the positions its rows cover, k_own[..., p_lo*Sk : (p_hi+1)*Sk], with
        a block-diagonal mask (same position, t <= step).
The text K/V are indexed through the query head's K/V head (GQA, no repeat) and shared by the N thoughts (no copy).
The forward stores the log-sum-exp per row; the backward recomputes probabilities from it (no attention matrix is
ever stored): one kernel for dQ, one for the text dK/dV (each text key block loops over the thoughts, query heads of
its group and the rows that can see it, so no atomics), one for the chain dK/dV.

Based on the structure of the Triton fused-attention tutorial (06-fused-attention.py): outer kernel, online-softmax
inner loop, log2-domain exponentials, lse saved for the backward, dQ and dK/dV in separate kernels.

Dimensions: B batch, N thoughts, Hq / Hkv query / key-value heads (GROUP = Hq / Hkv), L thinking positions (P the
first's text position; P + L text keys), Sq query steps, Sk own chain steps, D head dim (padded to a power of two >= 16 inside the kernels).
"""

import functools
import json
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from quietstar.attention import _check_shapes
from quietstar.attention import thought_attention as thought_attention_ref  # the reference this kernel must match

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(block_ms, block_ns, stages, warps):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w)
        for m in block_ms
        for n in block_ns
        for s in stages
        for w in warps
    ]


# Autotuning spaces, written for Hopper's larger shared memory (128-row tiles, 3-4 stages) and Ampere (64x64, 2-3
# stages); on either most of them spill registers, and the pruning below keeps only the ones that do not. Under pytest
# (and the CPU interpreter) one small pinned config keeps runs fast and reproducible.
FWD_SPACE = _configs([64, 128], [32, 64, 128], [2, 3, 4], [4, 8])
BWD_SPACE = _configs([32, 64], [32, 64, 128], [2, 3], [4, 8])
if INTERPRET or "PYTEST_VERSION" in os.environ:
    FWD_CONFIGS = BWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_stages=1, num_warps=4)]
else:
    FWD_CONFIGS, BWD_CONFIGS = FWD_SPACE, BWD_SPACE


# Which tiles the autotuner may try. Every config of the spaces above was compiled ahead of time for sm_80 and sm_90,
# bf16, head dims 64 and 128 (benchmarks/autotune_fit.py; benchmarks/RESULTS.md, "Autotune configs"): shared memory
# stays below the per-block limits (at most 113 KiB; A100 allows 163 KiB), but registers run out: past a thread's
# 255 ptxas spills to local memory (up to 50 KB a thread), slower than a smaller tile. Which configs spill is no simple
# function of the tile (a 32x32 dK/dV tile with 8 warps spilled at D=64 on sm_80, not at D=128), so the configs
# measured to compile without spills are listed in `TILES_WITHOUT_SPILLS` (tiles_without_spills.json, written by
# autotune_fit.py --write-table from the sweeps' CSVs in benchmarks/runs/autotune), by kernel, sm, element bytes
# (fp16 shares bf16's entries; fp32 has its own, from the configs the estimate below kept) and padded head dim, and only
# they are tried. Where nothing was measured (other head dims or GPUs) an estimate of the registers a thread keeps
# live decides,
#     (fp32 tiles + element_bytes / 4 * input tiles) / (32 * num_warps)    (the tiles in `_live_tiles`),
# against RULE_BUDGET: per kernel the largest estimate below the smallest one that spilled in bf16.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiles_without_spills.json")) as _file:
    TILES_WITHOUT_SPILLS = json.load(_file)  # kernel -> sm -> element bytes -> head dim -> ["MxN/stages/warps", ...]
RULE_BUDGET = {"fwd": 80, "bwd_dq": 64, "bwd_dkdv_text": 0, "bwd_dkdv_own": 56}  # 0: even the smallest tile spilled
_ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _live_tiles(kernel: str, block_m: int, block_n: int, head_dim: int) -> tuple[int, int]:
    """(fp32 elements, input-dtype elements) a program keeps live: accumulators and score tiles in fp32; q, k, v, dO."""
    rows, keys, scores = block_m * head_dim, block_n * head_dim, block_m * block_n
    if kernel == "fwd":  # acc, s/p; q, k, v
        return rows + scores, rows + 2 * keys
    if kernel == "bwd_dq":  # dq, p and dp/ds; q, dO, k, v
        return rows + 2 * scores, 2 * rows + 2 * keys
    return 2 * keys + 2 * scores, 2 * keys + 2 * rows  # bwd_dkdv_*: dk, dv, p and dp/ds; k, v, q, dO


def _tile_registers(config: triton.Config, kernel: str, head_dim: int, element_bytes: int) -> float:
    """The estimated 32-bit registers a thread of `config` of `kernel` keeps live (see RULE_BUDGET)."""
    fp32, inputs = _live_tiles(kernel, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], head_dim)
    return (fp32 + element_bytes / 4 * inputs) / (32 * config.num_warps)


def _tile_name(config: triton.Config) -> str:
    """"MxN/stages/warps", as in TILES_WITHOUT_SPILLS."""
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}/{config.num_stages}/{config.num_warps}"


def _keep_tile(config: triton.Config, kernel: str, head_dim: int, element_bytes: int, arch: int) -> bool:
    """Whether `config` of `kernel` compiles without register spills at this padded head dim, element size and
    compute capability (major * 10 + minor): measured where TILES_WITHOUT_SPILLS has it, else estimated."""
    measured = TILES_WITHOUT_SPILLS.get(kernel, {}).get(str(arch), {}).get(str(element_bytes), {}).get(str(head_dim))
    if measured is not None:
        return _tile_name(config) in measured
    return _tile_registers(config, kernel, head_dim, element_bytes) <= RULE_BUDGET[kernel]


def _kept_configs(configs, kernel: str, head_dim: int, element_bytes: int, arch: int) -> list:
    """The configs that fit in registers; if none does (fp32 with large heads), the one with the fewest."""
    kept = [c for c in configs if _keep_tile(c, kernel, head_dim, element_bytes, arch)]
    return kept or [min(configs, key=lambda c: _tile_registers(c, kernel, head_dim, element_bytes))]


def _prune(configs, named_args, *, kernel, **kwargs):
    """Autotune `early_config_prune`: `_kept_configs` on this GPU, before any config is compiled or timed."""
    q = named_args["Q"]
    major, minor = torch.cuda.get_device_capability(q.device) if q.is_cuda else (8, 0)  # interpreter: any
    return _kept_configs(configs, kernel, kwargs["HEAD_DIM"], _ELEMENT_BYTES[q.dtype], major * 10 + minor)


@triton.jit
def _load_rows(PTR, rows, d, SQ, HEAD_DIM_REAL, N_ROWS, stride_l, stride_s, stride_d):
    """Load (BLOCK_M, HEAD_DIM) of a (L, Sq, D) slab at flattened rows r = i * Sq + s; zeros outside."""
    pos, step = rows // SQ, rows % SQ
    ptrs = PTR + pos[:, None] * stride_l + step[:, None] * stride_s + d[None, :] * stride_d
    return tl.load(ptrs, mask=(rows[:, None] < N_ROWS) & (d[None, :] < HEAD_DIM_REAL), other=0.0)


@triton.jit
def _load_keys(PTR, cols, d, SK, HEAD_DIM_REAL, N_COLS, stride_l, stride_s, stride_d):
    """Load (BLOCK_N, HEAD_DIM) keys at flattened columns c = i * Sk + t (text keys: Sk = 1, stride_s unused)."""
    ptrs = PTR + (cols // SK)[:, None] * stride_l + (cols % SK)[:, None] * stride_s + d[None, :] * stride_d
    return tl.load(ptrs, mask=(cols[:, None] < N_COLS) & (d[None, :] < HEAD_DIM_REAL), other=0.0)


@triton.jit
def _row_block(N, HQ, L, SQ, GROUP, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M query rows of one (b, n, h): (b, n, h, hkv, rows, first_pos, last_pos).
    Late rows see the most text keys, so they are launched first and the heaviest programs do not form the tail."""
    pid_m, pid_bnh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets
    h, n, b = pid_bnh % HQ, (pid_bnh // HQ) % N, pid_bnh // (HQ * N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    first_pos = (pid_m * BLOCK_M) // SQ
    last_pos = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // SQ, L - 1)
    return b, n, h, h // GROUP, rows, first_pos, last_pos


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # UPCAST only under the CPU interpreter, whose tl.dot mis-computes bf16 operands.
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(rows, cols, SQ, SK, N_COLS, step_offset, position_offset, OWN: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask. Text keys: j <= position_offset + i. Own keys: same position and t <= step_offset + s.
    Columns past the N_COLS keys are never visible."""
    pos = rows // SQ
    if OWN:
        same_position = (cols // SK)[None, :] == pos[:, None]
        visible = same_position & ((cols % SK)[None, :] <= (rows % SQ + step_offset)[:, None])
    else:
        visible = cols[None, :] <= (pos + position_offset)[:, None]
    return visible & (cols[None, :] < N_COLS)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, rows, d, K, V, lo, hi, N_COLS, SQ, SK, step_offset, position_offset, qk_scale,
               stride_kl, stride_ks, stride_kd, stride_vl, stride_vs, stride_vd, HEAD_DIM_REAL,
               OWN: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_keys(K, cols, d, SK, HEAD_DIM_REAL, N_COLS, stride_kl, stride_ks, stride_kd)
        v = _load_keys(V, cols, d, SK, HEAD_DIM_REAL, N_COLS, stride_vl, stride_vs, stride_vd)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # log2 domain
        s = tl.where(_visible(rows, cols, SQ, SK, N_COLS, step_offset, position_offset, OWN), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=FWD_CONFIGS, key=["L", "SQ", "SK", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": functools.partial(_prune, kernel="fwd")})
@triton.jit
def _thought_attn_fwd(
    Q, K_TEXT, V_TEXT, K_OWN, V_OWN, O, LSE,
    sqb, sqn, sqh, sql, sqs, sqd,
    skb, skh, skl, skd, svb, svh, svl, svd,
    sob, son, soh, sol, sos, sod,
    sokb, sokn, sokh, sokl, soks, sokd, sovb, sovn, sovh, sovl, sovs, sovd,
    N, HQ, L, SQ, SK, GROUP, step_offset, position_offset, sm_scale, HEAD_DIM_REAL,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b, n, h, hkv, rows, first_pos, last_pos = _row_block(N, HQ, L, SQ, GROUP, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + b * sqb + n * sqn + h * sqh, rows, d, SQ, HEAD_DIM_REAL, L * SQ, sql, sqs, sqd)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # (a) text keys 0 .. position_offset + last_pos: causal block skipping
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, rows, d, K_TEXT + b * skb + hkv * skh, V_TEXT + b * svb + hkv * svh,
        0, position_offset + last_pos + 1, position_offset + L, SQ, 1, step_offset, position_offset, qk_scale,
        skl, 0, skd, svl, 0, svd, HEAD_DIM_REAL,
        False, BLOCK_N, UPCAST, PRECISION,
    )
    # (b) own chain keys of the positions first_pos .. last_pos (contiguous in the flattened (L, Sk) layout)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, rows, d,
        K_OWN + b * sokb + n * sokn + hkv * sokh, V_OWN + b * sovb + n * sovn + hkv * sovh,
        first_pos * SK, (last_pos + 1) * SK, L * SK, SQ, SK, step_offset, 0, qk_scale,
        sokl, soks, sokd, sovl, sovs, sovd, HEAD_DIM_REAL, True, BLOCK_N, UPCAST, PRECISION,
    )
    out = acc / l_i[:, None]
    pos, step = rows // SQ, rows % SQ
    o_ptrs = O + b * sob + n * son + h * soh + pos[:, None] * sol + step[:, None] * sos + d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < L * SQ) & (d[None, :] < HEAD_DIM_REAL))
    lse = m_i / LOG2E + tl.log(l_i)  # natural-log log-sum-exp of the scaled scores
    tl.store(LSE + ((b * N + n) * HQ + h) * L * SQ + rows, lse, mask=rows < L * SQ)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, rows, d, K, V, lo, hi, N_COLS, SQ, SK, step_offset, position_offset, qk_scale,
                  stride_kl, stride_ks, stride_kd, stride_vl, stride_vs, stride_vd, HEAD_DIM_REAL,
                  OWN: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_keys(K, cols, d, SK, HEAD_DIM_REAL, N_COLS, stride_kl, stride_ks, stride_kd)
        v = _load_keys(V, cols, d, SK, HEAD_DIM_REAL, N_COLS, stride_vl, stride_vs, stride_vd)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        visible = _visible(rows, cols, SQ, SK, N_COLS, step_offset, position_offset, OWN)
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    return dq


@triton.autotune(configs=BWD_CONFIGS, key=["L", "SQ", "SK", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": functools.partial(_prune, kernel="bwd_dq")})
@triton.jit
def _thought_attn_bwd_dq(
    Q, K_TEXT, V_TEXT, K_OWN, V_OWN, DO, LSE, DELTA, DQ,
    sqb, sqn, sqh, sql, sqs, sqd,
    skb, skh, skl, skd, svb, svh, svl, svd,
    sokb, sokn, sokh, sokl, soks, sokd, sovb, sovn, sovh, sovl, sovs, sovd,
    N, HQ, L, SQ, SK, GROUP, step_offset, position_offset, sm_scale, HEAD_DIM_REAL,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ for BLOCK_M rows of one (b, n, h). DO and DQ are contiguous (B, N, Hq, L, Sq, D)."""
    b, n, h, hkv, rows, first_pos, last_pos = _row_block(N, HQ, L, SQ, GROUP, BLOCK_M)
    bnh = (b * N + n) * HQ + h
    d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + b * sqb + n * sqn + h * sqh, rows, d, SQ, HEAD_DIM_REAL, L * SQ, sql, sqs, sqd)
    row_offset = bnh * L * SQ * HEAD_DIM_REAL
    do = _load_rows(DO + row_offset, rows, d, SQ, HEAD_DIM_REAL, L * SQ, SQ * HEAD_DIM_REAL, HEAD_DIM_REAL, 1)
    lse2 = tl.load(LSE + bnh * L * SQ + rows, mask=rows < L * SQ, other=0.0) * LOG2E
    delta = tl.load(DELTA + bnh * L * SQ + rows, mask=rows < L * SQ, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, rows, d, K_TEXT + b * skb + hkv * skh, V_TEXT + b * svb + hkv * svh,
        0, position_offset + last_pos + 1, position_offset + L, SQ, 1, step_offset, position_offset, qk_scale,
        skl, 0, skd, svl, 0, svd, HEAD_DIM_REAL,
        False, BLOCK_N, UPCAST, PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, rows, d,
        K_OWN + b * sokb + n * sokn + hkv * sokh, V_OWN + b * sovb + n * sovn + hkv * sovh,
        first_pos * SK, (last_pos + 1) * SK, L * SK, SQ, SK, step_offset, 0, qk_scale,
        sokl, soks, sokd, sovl, sovs, sovd, HEAD_DIM_REAL, True, BLOCK_N, UPCAST, PRECISION,
    )
    dq *= sm_scale
    dq_ptrs = DQ + row_offset + rows[:, None] * HEAD_DIM_REAL + d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < L * SQ) & (d[None, :] < HEAD_DIM_REAL))


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, cols, d, Q, DO, LSE, DELTA, row_lo, row_hi, N_COLS, SQ, SK, L, step_offset,
                  position_offset, qk_scale, sql, sqs, sqd, HEAD_DIM_REAL,
                  OWN: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query rows row_lo .. row_hi of one (b, n, h)."""
    for start in range(row_lo, row_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, rows, d, SQ, HEAD_DIM_REAL, L * SQ, sql, sqs, sqd)
        do = _load_rows(DO, rows, d, SQ, HEAD_DIM_REAL, L * SQ, SQ * HEAD_DIM_REAL, HEAD_DIM_REAL, 1)
        lse2 = tl.load(LSE + rows, mask=rows < L * SQ, other=0.0) * LOG2E
        delta = tl.load(DELTA + rows, mask=rows < L * SQ, other=0.0)
        s_t = _dot(k, tl.trans(q), UPCAST, PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        visible = _visible(rows, cols, SQ, SK, N_COLS, step_offset, position_offset, OWN)
        visible = tl.trans(visible) & (rows[None, :] < L * SQ)
        p_t = tl.where(visible, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST, PRECISION)
        dp_t = _dot(v, tl.trans(do), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, PRECISION)
    return dk, dv


@triton.autotune(configs=BWD_CONFIGS, key=["L", "SQ", "N_KEYS", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": functools.partial(_prune, kernel="bwd_dkdv_text")})
@triton.jit
def _thought_attn_bwd_dkdv_text(
    Q, K_TEXT, V_TEXT, DO, LSE, DELTA, DK, DV,
    sqb, sqn, sqh, sql, sqs, sqd,
    skb, skh, skl, skd, svb, svh, svl, svd,
    N, HQ, HKV, L, SQ, GROUP, step_offset, position_offset, N_KEYS, sm_scale, HEAD_DIM_REAL,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of BLOCK_N text keys (of N_KEYS = position_offset + L) of one (b, hkv): sums over the N thoughts, the
    GROUP query heads sharing the K/V head and every row whose position can see the keys (position_offset + i >= first
    key). DK/DV: contiguous (B, Hkv, N_KEYS, D)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: batch offsets can exceed 2**31
    hkv, b = pid_bh % HKV, pid_bh // HKV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k = _load_keys(K_TEXT + b * skb + hkv * skh, cols, d, 1, HEAD_DIM_REAL, N_KEYS, skl, 0, skd)
    v = _load_keys(V_TEXT + b * svb + hkv * svh, cols, d, 1, HEAD_DIM_REAL, N_KEYS, svl, 0, svd)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    row_lo = tl.maximum(pid_n * BLOCK_N - position_offset, 0) * SQ  # causal: earlier positions never see these keys
    for n in range(0, N):
        for g in range(0, GROUP):
            bnh = (b * N + n) * HQ + hkv * GROUP + g
            dk, dv = _bwd_kv_inner(
                dk, dv, k, v, cols, d, Q + b * sqb + n * sqn + (hkv * GROUP + g) * sqh,
                DO + bnh * L * SQ * HEAD_DIM_REAL, LSE + bnh * L * SQ, DELTA + bnh * L * SQ,
                row_lo, L * SQ, N_KEYS, SQ, 1, L, step_offset, position_offset, qk_scale, sql, sqs, sqd, HEAD_DIM_REAL,
                False, BLOCK_M, UPCAST, PRECISION,
            )
    dk *= sm_scale
    ptrs = pid_bh * N_KEYS * HEAD_DIM_REAL + cols[:, None] * HEAD_DIM_REAL + d[None, :]
    mask = (cols[:, None] < N_KEYS) & (d[None, :] < HEAD_DIM_REAL)
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.autotune(configs=BWD_CONFIGS, key=["L", "SQ", "SK", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": functools.partial(_prune, kernel="bwd_dkdv_own")})
@triton.jit
def _thought_attn_bwd_dkdv_own(
    Q, K_OWN, V_OWN, DO, LSE, DELTA, DK, DV,
    sqb, sqn, sqh, sql, sqs, sqd,
    sokb, sokn, sokh, sokl, soks, sokd, sovb, sovn, sovh, sovl, sovs, sovd,
    N, HQ, HKV, L, SQ, SK, GROUP, step_offset, sm_scale, HEAD_DIM_REAL,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of BLOCK_N own chain keys (flattened c = i * Sk + t) of one (b, n, hkv): only rows of the same positions
    see them. DK/DV: contiguous (B, N, Hkv, L, Sk, D)."""
    pid_c, pid_bnh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: batch offsets can exceed 2**31
    hkv, n, b = pid_bnh % HKV, (pid_bnh // HKV) % N, pid_bnh // (HKV * N)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k = _load_keys(K_OWN + b * sokb + n * sokn + hkv * sokh, cols, d, SK, HEAD_DIM_REAL, L * SK, sokl, soks, sokd)
    v = _load_keys(V_OWN + b * sovb + n * sovn + hkv * sovh, cols, d, SK, HEAD_DIM_REAL, L * SK, sovl, sovs, sovd)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    first_pos = (pid_c * BLOCK_N) // SK
    last_pos = tl.minimum((pid_c * BLOCK_N + BLOCK_N - 1) // SK, L - 1)
    for g in range(0, GROUP):
        bnh = (b * N + n) * HQ + hkv * GROUP + g
        dk, dv = _bwd_kv_inner(
            dk, dv, k, v, cols, d, Q + b * sqb + n * sqn + (hkv * GROUP + g) * sqh,
            DO + bnh * L * SQ * HEAD_DIM_REAL, LSE + bnh * L * SQ, DELTA + bnh * L * SQ,
            first_pos * SQ, (last_pos + 1) * SQ, L * SK, SQ, SK, L, step_offset, 0, qk_scale, sql, sqs, sqd,
            HEAD_DIM_REAL, True, BLOCK_M, UPCAST, PRECISION,
        )
    dk *= sm_scale
    ptrs = pid_bnh * L * SK * HEAD_DIM_REAL + cols[:, None] * HEAD_DIM_REAL + d[None, :]
    mask = (cols[:, None] < L * SK) & (d[None, :] < HEAD_DIM_REAL)
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# host side


def _launch_settings(q: Tensor) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM_REAL=head_dim,
        HEAD_DIM=max(16, triton.next_power_of_2(head_dim)),
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
    )


def _forward(q, k_text, v_text, k_own, v_own, scale, step_offset, position_offset):
    batch, n_thoughts, n_heads, length, n_steps, _ = q.shape
    n_kv_heads, n_own = k_text.shape[1], k_own.shape[4]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch * n_thoughts * n_heads, length * n_steps, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(length * n_steps, meta["BLOCK_M"]), batch * n_thoughts * n_heads)
    _thought_attn_fwd[grid](
        q, k_text, v_text, k_own, v_own, out, lse,
        *q.stride(), *k_text.stride(), *v_text.stride(), *out.stride(), *k_own.stride(), *v_own.stride(),
        n_thoughts, n_heads, length, n_steps, n_own, n_heads // n_kv_heads, step_offset, position_offset, scale,
        **_launch_settings(q),
    )
    return out, lse


def _backward(grad_out, q, k_text, v_text, k_own, v_own, out, lse, scale, step_offset, position_offset):
    batch, n_thoughts, n_heads, length, n_steps, _ = q.shape
    n_kv_heads, n_own = k_text.shape[1], k_own.shape[4]
    group = n_heads // n_kv_heads
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).reshape(lse.shape)  # rowsum(dO * O), as in flash-attention
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk_text, dv_text = torch.empty(2, *k_text.shape, dtype=k_text.dtype, device=q.device).unbind(0)
    dk_own, dv_own = torch.empty(2, *k_own.shape, dtype=k_own.dtype, device=q.device).unbind(0)
    settings = _launch_settings(q)
    grid = lambda meta: (triton.cdiv(length * n_steps, meta["BLOCK_M"]), batch * n_thoughts * n_heads)
    _thought_attn_bwd_dq[grid](
        q, k_text, v_text, k_own, v_own, grad_out, lse, delta, dq,
        *q.stride(), *k_text.stride(), *v_text.stride(), *k_own.stride(), *v_own.stride(),
        n_thoughts, n_heads, length, n_steps, n_own, group, step_offset, position_offset, scale, **settings,
    )
    n_keys = k_text.shape[2]  # position_offset + length
    grid = lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), batch * n_kv_heads)
    _thought_attn_bwd_dkdv_text[grid](
        q, k_text, v_text, grad_out, lse, delta, dk_text, dv_text,
        *q.stride(), *k_text.stride(), *v_text.stride(),
        n_thoughts, n_heads, n_kv_heads, length, n_steps, group, step_offset, position_offset, n_keys, scale,
        **settings,
    )
    grid = lambda meta: (triton.cdiv(length * n_own, meta["BLOCK_N"]), batch * n_thoughts * n_kv_heads)
    _thought_attn_bwd_dkdv_own[grid](
        q, k_own, v_own, grad_out, lse, delta, dk_own, dv_own,
        *q.stride(), *k_own.stride(), *v_own.stride(),
        n_thoughts, n_heads, n_kv_heads, length, n_steps, n_own, group, step_offset, scale, **settings,
    )
    return dq, dk_text, dv_text, dk_own, dv_own


class ThoughtAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, the output and the per-row log-sum-exp; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k_text, v_text, k_own, v_own, scale, step_offset, position_offset):
        out, lse = _forward(q, k_text, v_text, k_own, v_own, scale, step_offset, position_offset)
        ctx.save_for_backward(q, k_text, v_text, k_own, v_own, out, lse)
        ctx.scale, ctx.step_offset, ctx.position_offset = scale, step_offset, position_offset
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _backward(grad_out, *ctx.saved_tensors, ctx.scale, ctx.step_offset, ctx.position_offset)
        return *grads, None, None, None


def thought_attention(
    q: Tensor,
    k_base: Tensor,
    v_base: Tensor,
    k_own: Tensor,
    v_own: Tensor,
    *,
    scale: float | None = None,
    step_offset: int = 0,
    position_offset: int = 0,
) -> Tensor:
    """Fused thought attention; same signature, shapes and semantics as `quietstar.thought_attention`.

    q (B, N, Hq, L, Sq, D); k_base, v_base (B, Hkv, P + L, D); k_own, v_own (B, N, Hkv, L, Sk, D)
    -> (B, N, Hq, L, Sq, D), P = `position_offset`.
    fp16 / bf16 / fp32 inputs (all the same dtype), fp32 accumulation. CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 (slow; for tests).
    """
    _check_shapes(q, k_base, v_base, k_own, v_own, step_offset, position_offset)
    if len({t.dtype for t in (q, k_base, v_base, k_own, v_own)}) != 1:
        raise ValueError("thought_attention (triton): q, k and v must share one dtype.")
    if not (q.is_cuda or INTERPRET):
        raise ValueError("thought_attention (triton) needs CUDA tensors (or TRITON_INTERPRET=1 on CPU).")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ThoughtAttentionFunction.apply(q, k_base, v_base, k_own, v_own, scale, step_offset, position_offset)


__all__ = ["thought_attention", "thought_attention_ref", "ThoughtAttentionFunction"]
