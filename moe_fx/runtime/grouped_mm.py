"""Grouped matmul ``moe_fx::grouped_mm``: x [M, K] expert-major times one weight per group.

Implementations behind one op, chosen per call:
- everywhere: one mm per group, offsets read on the host. It serves the dtypes and shapes
  torch._grouped_mm cannot compile (fp32 / fp16 before torch 2.14, unaligned sizes).
- CUDA, bf16/fp16/fp32: a Triton kernel with no host sync (so it can be captured in a CUDA graph).
  Groups are cut into row tiles on the device; neighbouring programs take the row tiles of one
  expert for the same column block, so they share its weight tile through L2. With few rows per
  expert (decode) it streams the weights faster than torch._grouped_mm.
- CUDA, aligned bf16 with many rows per expert: torch._grouped_mm, faster there
  (scripts/cuda_grouped_mm_check.py times the two).
"""

from __future__ import annotations

import torch

from moe_fx.runtime.library import LIB

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# torch._grouped_mm compiles for bf16 only before torch 2.14 and needs 16-byte aligned rows.
_NATIVE_DTYPES = (torch.bfloat16,)
_ALIGN_ELEMENTS = 8
# Up to this many rows per expert on average the Triton kernel beat torch._grouped_mm on every
# projection of the bench layers on an H100 (1.07x to 2.4x, CUDA-graph timing); at 32 rows
# (Mixtral, 128 tokens) it ranged from 0.90x to 1.05x, and it loses at more.
TRITON_MAX_ROWS_PER_GROUP = 16


def native_grouped_mm_ok(x: torch.Tensor, w_KN: torch.Tensor) -> bool:
    """Whether torch._grouped_mm computes x @ w_KN per group on this torch."""
    k, n = w_KN.shape[-2:]
    return (
        x.dtype in _NATIVE_DTYPES
        and w_KN.dtype == x.dtype
        and k % _ALIGN_ELEMENTS == 0
        and n % _ALIGN_ELEMENTS == 0
    )


@torch.library.custom_op(f"{LIB}::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] expert-major, w [G, K, N], offsets [G] int32 -> [M, N]. Rows past offsets[-1] are
    padding that callers drop: their values are unspecified (torch._grouped_mm leaves them unwritten)."""
    return _grouped_mm_loop(x, w, offsets)


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _(x, w, offsets):
    torch._check(x.shape[1] == w.shape[1], lambda: f"grouped_mm: x {x.shape} vs w {w.shape}")
    return x.new_empty((x.shape[0], w.shape[2]))


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moe_fx.grouped_mm(grad, w.transpose(-2, -1), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.moe_fx.grouped_mm_weight_grad(x, grad, offsets)
    return grad_x, grad_w, None


@torch.library.custom_op(f"{LIB}::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K], grad [M, N] expert-major -> [G, K, N]: per-group x_g.T @ grad_g."""
    out = x.new_zeros((offsets.shape[0], x.shape[1], grad.shape[1]))
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[g])
        start = end
    return out


@grouped_mm_weight_grad.register_fake
def _(x, grad, offsets):
    return x.new_empty((offsets.shape[0], x.shape[1], grad.shape[1]))


torch.library.register_autograd(f"{LIB}::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup)


def cuda_kernel_for(*, rows: int, groups: int, native_ok: bool, capturing: bool, tuned: bool) -> str:
    """Which kernel computes one call on CUDA: "torch" (torch._grouped_mm) or "triton".

    ``native_ok``: torch._grouped_mm takes these operands; ``capturing``: a CUDA graph is being
    captured; ``tuned``: the Triton kernel has run (so is compiled and tuned) for this size."""
    if not native_ok:
        return "triton"
    if rows > TRITON_MAX_ROWS_PER_GROUP * groups:
        return "torch"
    # Few rows per expert: the Triton kernel streams the weights faster, but launching it costs
    # the host about 5x what torch._grouped_mm's launch does, and outside a CUDA graph the host
    # paces such a call. So: the Triton kernel inside a capture, torch._grouped_mm outside, except
    # for the first call of a size, which tunes the Triton kernel (tuning synchronizes, so it
    # cannot run inside a capture; a capture that meets an untuned size keeps torch's kernel).
    if capturing:
        return "triton" if tuned else "torch"
    return "torch" if tuned else "triton"


if triton is not None:

    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SWAP_AB): the configs that won some projection of
    # moe_fx.bench's layers on an H100 (decode: 16-row tiles, narrow column blocks and deep K, which
    # keep enough weight loads in flight; prefill: 128 x 256).
    _TILES = ((16, 32, 256, 4, 4, True), (16, 32, 512, 4, 3, False), (16, 32, 512, 4, 3, True),
              (16, 64, 128, 4, 6, True), (16, 64, 256, 4, 4, True), (16, 64, 256, 4, 4, False),
              (16, 128, 128, 4, 4, False), (16, 128, 256, 4, 3, False), (16, 128, 256, 4, 3, True),
              (32, 64, 256, 4, 4, True), (32, 128, 128, 4, 4, False), (64, 64, 64, 4, 5, True),
              (64, 128, 64, 4, 4, False), (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False))

    def _tile_configs() -> list:
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP_AB": swap}, num_warps=w, num_stages=st)
                for m, n, k, w, st, swap in _TILES]

    def _prune_tiles(configs, named_args, **kwargs):
        # Row tiles much taller than an expert's average share only multiply empty rows.
        rows = named_args["rows_per_group"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * rows)]
        return kept or configs[:1]

    # Keyed on the row count's power of two as well: at one row per expert, 8 routed rows and 128
    # want different column blocks (how many programs stream weights).
    @triton.autotune(configs=_tile_configs(), key=["N", "K", "G", "rows_per_group", "rows_pow2"],
                     prune_configs_by={"early_config_prune": _prune_tiles})
    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, out_ptr, ends_ptr, M, N, K, rows_per_group, rows_pow2, busy_groups_bound,
                           stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_om,
                           G: tl.constexpr, G_POW2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
                           GROUP_TILES: tl.constexpr = 8):
        # Programs walk a virtual list of row tiles: each group's rows cut into BLOCK_M tiles. Its
        # length is only known on the device; the grid covers the bound cdiv(M, BLOCK_M) +
        # busy_groups_bound (at most min(G, M) groups have rows) and surplus programs exit.
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        m_tiles_bound = tl.cdiv(M, BLOCK_M) + busy_groups_bound
        # GROUP_TILES row tiles x all column blocks per band: the row tiles of one expert run side
        # by side, so they share each weight tile through L2.
        band = pid // (GROUP_TILES * n_tiles)
        first = band * GROUP_TILES
        band_height = tl.minimum(m_tiles_bound - first, GROUP_TILES)
        within = pid % (GROUP_TILES * n_tiles)
        tile_m = first + within % band_height
        tile_n = within // band_height

        g_idx = tl.arange(0, G_POW2)
        ends = tl.load(ends_ptr + g_idx, mask=g_idx < G, other=0).to(tl.int32)
        starts = tl.load(ends_ptr + g_idx - 1, mask=(g_idx >= 1) & (g_idx < G), other=0).to(tl.int32)
        tiles = tl.where(g_idx < G, tl.cdiv(ends - starts, BLOCK_M), 0)
        tile_ends = tl.cumsum(tiles, 0)
        if tile_m >= tl.sum(tiles, 0):
            return

        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_cols = cols < N
        g = tl.sum((tile_ends <= tile_m).to(tl.int32), 0)
        first_tile_of_g = tl.sum(tl.where(g_idx < g, tiles, 0), 0)
        row_start = tl.sum(tl.where(g_idx == g, starts, 0), 0)
        row_end = tl.sum(tl.where(g_idx == g, ends, 0), 0)
        rows = row_start + (tile_m - first_tile_of_g) * BLOCK_M + tl.arange(0, BLOCK_M)
        in_group = rows < row_end
        # Rows outside the group still load (clamped in range) but are never stored: no masks in
        # the inner loop's loads.
        safe_rows = tl.minimum(rows, M - 1).to(tl.int64)
        safe_cols = tl.minimum(cols, N - 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + safe_rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_tile = w_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + safe_cols[None, :] * stride_wn
        # SWAP_AB computes out.T = w.T @ x.T: with few rows the weight's columns fill the MMA's
        # wide side and the rows its narrow one.
        acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(x_tile, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_tile, mask=k_ok[:, None], other=0.0)
            if SWAP_AB:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_tile += BLOCK_K * stride_xk
            w_tile += BLOCK_K * stride_wk
        if SWAP_AB:
            acc = tl.trans(acc)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=in_group[:, None] & out_cols[None, :])

    def _size_buckets(rows: int, groups: int) -> tuple[int, int]:
        """The kernel's autotuning buckets: (rows per group, rows), each as a power of two."""
        return triton.next_power_of_2(max(1, rows // groups)), triton.next_power_of_2(rows)

    def _tuning_key(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> tuple:
        """What selects a compiled and tuned variant of the kernel (a superset): its autotuning key,
        and the integer values and pointer alignments Triton specializes on. A new key means a
        compilation and a tuning run."""
        m, g = x.shape[0], w.shape[0]
        ints = (m, min(g, m), *x.stride(), *w.stride())
        pointers = (x.data_ptr(), w.data_ptr(), offsets.data_ptr())
        return (x.dtype, *w.shape, *_size_buckets(m, g),
                *(v % 16 == 0 or v == 1 for v in ints), *(p % 16 == 0 for p in pointers))

    def _grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        g, _, n = w.shape
        out = x.new_empty((m, n))
        if m == 0 or n == 0:
            return out
        busy_groups_bound = min(g, m)
        grid = lambda meta: ((triton.cdiv(m, meta["BLOCK_M"]) + busy_groups_bound) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _grouped_mm_kernel[grid](x, w, out, offsets, m, n, k, *_size_buckets(m, g), busy_groups_bound,
                                 x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
                                 G=g, G_POW2=triton.next_power_of_2(g),
                                 # fp32 stays fp32 (tl.dot would round it to tf32; torch.mm does not by default)
                                 PRECISION="ieee" if x.dtype == torch.float32 else None)
        return out

    _tuned_keys: set[tuple] = set()  # sizes the Triton kernel has run at (so compiled and tuned)

    @grouped_mm.register_kernel("cuda")
    def _(x, w, offsets):
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w.dtype != x.dtype:
            return _grouped_mm_loop(x, w, offsets)
        key = _tuning_key(x, w, offsets)
        kernel = cuda_kernel_for(rows=x.shape[0], groups=w.shape[0], native_ok=native_grouped_mm_ok(x, w),
                                 capturing=torch.cuda.is_current_stream_capturing(), tuned=key in _tuned_keys)
        if kernel == "torch":
            return torch._grouped_mm(x, w, offs=offsets)
        out = _grouped_mm_triton(x, w, offsets)
        _tuned_keys.add(key)
        return out
