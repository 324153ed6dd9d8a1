"""moe_fx configuration, a torch-style config module.

Read and set attributes directly (``moe_fx.config.lowering = "all2allv"``) or scope a change with
``moe_fx.config.patch(lowering="all2allv")``, which works as a context manager and as a decorator.
Settings are read when a graph is compiled: change them before the first call of a compiled model
(or call ``torch._dynamo.reset()``). Each value is checked when it is set (moe_fx/config_check.py):
a wrong type or value raises ``moe_fx.errors.ConfigError`` naming the option and its allowed values.
"""

import sys
from typing import Optional

from torch.utils._config_module import Config

from moe_fx.config_check import install_checked_config_module

# Which EP lowering replaces each MoE experts region:
#   "auto"      pick per block from shape hints (see moe_fx/lowering/select.py and the README)
#   "allgather" all-gather tokens + routing, compute local experts, reduce-scatter (no split-size exchange)
#   "all2allv"  exact variable-size all-to-all with host-synchronised split sizes
#   "mc2"       static-capacity dispatch/combine, no host sync (needs a token bound: see max_tokens_per_rank)
#   "mc2|all2allv" a run-time switch: mc2 while the largest rank's token count is at most
#               auto_mc2_max_tokens, else all2allv (one all-gather of the token count per block)
lowering: str = Config(env_name_default="MOE_FX_LOWERING", default="auto")

# Compiler that receives the rewritten graph: "inductor", "aot_eager", "eager", "torchair" (Ascend:
# torchair.get_npu_backend with npu.compiler_config), or any name known to torch._dynamo.list_backends().
inner_backend: str = Config(env_name_default="MOE_FX_INNER_BACKEND", default="inductor")

# What the ranks' inputs to an MoE block hold:
#   "per_rank"   every rank its own tokens (data parallel)
#   "replicated" every rank the same tokens (tensor parallel): each computes a slice, all gather
tokens: str = "per_rank"

# With tokens="replicated": name of the c10d group whose ranks hold the same tokens (tensor
# parallel; ``pg.group_name``). None: the EP group. Tokens are split over it, experts over ep_group.
tp_group: Optional[str] = None

# Per-block strategy, before `lowering`: {fnmatch pattern over the experts' module path: strategy},
# e.g. {"model.layers.0.*": "all2allv"}. The first matching pattern wins.
lowering_overrides: dict = {}

# torch.compile mode for the inner compiler when it is inductor ("reduce-overhead" captures CUDA
# graphs, "max-autotune", ...): torch.compile(backend=moe_fx.backend) cannot take mode= itself.
inner_mode: Optional[str] = None

# Name of the c10d process group that holds the experts (``pg.group_name``). None: the default
# process group when torch.distributed is initialized, else no expert parallelism (ep == 1).
ep_group: Optional[str] = None

# NCCL protocol of the large static EP exchanges (CUDA): a block whose static buffers send at least
# ep_nccl_bulk_bytes per rank (AllGather's C*H, MC2's C*K*H elements) runs its collectives on a
# communicator of moe_fx's own over the EP group's ranks, started with NCCL_PROTO set to this
# ("Simple", "LL128", "LL"); smaller ones stay on the EP group. None: every block on the EP group,
# whatever NCCL picks. NCCL 2.28 picked LL for the bounded AllGather's 16 MB exchanges on 2 H200s
# (README, "Multi-GPU benchmark"). Costs one more NCCL communicator per EP group; it also times
# out after collective_timeout_s.
ep_nccl_protocol: Optional[str] = "Simple"
ep_nccl_bulk_bytes: int = 4 << 20

# Overlap of the bounded AllGather's exchanges with the experts (experimental, off): the block's
# token capacity is cut into this many chunks, every chunk's all-gather is issued before the first
# chunk's experts run, and every reduce-scatter is awaited after the last chunk's experts, so the
# exchange of one chunk can run beside the experts of another (inference graphs, tokens="per_rank").
# 1: no chunking. On 2 H200s 2 chunks made the 4096-token layers 1.27-1.51x slower than 1 (the
# collectives stretched across the other chunk's kernels; README, "Multi-GPU benchmark").
ep_overlap_chunks: int = 1

# What to do with a graph that holds an MoE-like block moe_fx cannot rewrite:
#   "warn"  keep the original graph for that block and log a warning with the reason
#   "raise" raise moe_fx.UnsupportedMoEError
on_unmatched: str = Config(env_name_default="MOE_FX_ON_UNMATCHED", default="warn")

# How MC2 (off Ascend) moves rows:
#   "all_to_all" fixed C*K-row buffers per rank pair through all_to_all_single (NCCL, gloo); has a backward
#   "symm_mem"   torch symmetric memory (CUDA, NVSHMEM): all_to_all_vdev_2d moves only the routed rows,
#                splits stay on the device; forward only, <= 16 experts per rank and <= 16 ranks
#                (moe_fx/runtime/symm_mem.py). Not yet run on several GPUs: opt in.
mc2_transport: str = "all_to_all"

# Largest number of tokens any rank feeds one MoE block, when the user knows it. The same value
# on every rank; "auto" uses it (local token counts differ between ranks and must not decide), and
# "mc2" and AllGather's static form size their buffers from it (a rank with more tokens gets an
# error, never a dropped token).
max_tokens_per_rank: Optional[int] = None

# "auto" thresholds. AllGather moves ep*T rows and exchanges no split sizes; All2AllV moves about T*K
# rows after a device-to-host sync of the split sizes; MC2 moves ep*C*K rows (C its capacity), no sync.
# Pick MC2 when every rank is known to feed at most this many tokens (max_tokens_per_rank, or
# tokens="replicated" with a static count); it is also the capacity of the run-time switch:
auto_mc2_max_tokens: int = 256
# Otherwise pick AllGather while ep <= top_k * this factor (its volume is not yet larger):
auto_allgather_ep_per_topk: float = 1.0

# With no known token bound (and ep > top_k * auto_allgather_ep_per_topk), let "auto" emit the
# run-time switch "mc2|all2allv" rather than always all2allv.
auto_runtime_switch: bool = True

# Seconds a rank waits for its peers at the entry of an MoE block (moe_fx's agreement exchange,
# moe_fx/runtime/guard.py, on a gloo group of moe_fx's own with this timeout) before it raises
# CollectiveTimeoutError naming the ranks that did not arrive. It must exceed the largest skew
# between ranks at a block's entry: a step's compute imbalance, and on the first call of a graph
# the difference between the ranks' compile times (raise it for long inductor compiles). The
# strategy's own exchanges on gloo, and on CUDA's bulk communicator (ep_nccl_protocol), run on a
# group of moe_fx's own with this timeout too: a peer that raised inside a block stops the others.
collective_timeout_s: float = 30.0

# When the ranks exchange and compare their call's fingerprint and routing check on the host:
#   "auto"       every call where the block's strategy reads the host anyway (CPU, All2AllV, the
#                switch, AllGather without a token bound); elsewhere (CUDA MC2, AllGather with a
#                bound, ep = 1) the first call of each block, then a device-side check only
#   "every_call" every call (a host sync on CUDA for every block)
#   "first_call" the first call of each block only
rank_check: str = "auto"

# Prove every recognized block on numbers before rewriting it (moe_fx/passes/probe.py): the traced
# experts code and moe_fx's ep = 1 rewrite run on probe inputs (random states, routings that hit
# every expert) at compile time and must agree to the dtype's tolerance; a block where they do not
# is left as traced, with a near-miss. Every rank keeps a block only if every rank's probe agreed.
probe_check: bool = True

# Rewrite with ep == 1 too (one sorted grouped matmul instead of the traced experts code).
rewrite_without_ep: bool = True



# The Ascend (torch_npu) lowering, moe_fx/lowering/npu/ and the README's Ascend section.
class npu:
    # Emit torch_npu ops even when the graph's tensors are not on an "npu" device (tests: on CPU
    # against moe_fx.testing.npu_emulator). Blocks on "npu" tensors always get the Ascend lowering.
    force: bool = False
    # Ascend SoC family for "auto" and the MC2 limits: "A2" (910B) or "A3" (910_93). None: ask torch_npu.
    soc: Optional[str] = None
    # MC2 ops: "auto" (npu_moe_distribute_dispatch_v2/combine_v2 when torch_npu has them, else v1), "v2", "v1".
    mc2_version: str = "auto"
    # torchair.CompilerConfig for inner_backend="torchair"; None: torchair.CompilerConfig().
    compiler_config: Optional[object] = None
    # The process group MC2 (npu_moe_distribute_dispatch/combine) runs on, by name. The torch_npu
    # doc forbids other operators in MC2's communication domain, so it must not be the EP group
    # itself. None: one group with the EP group's ranks, created by moe_fx once per EP group.
    mc2_group: Optional[str] = None


install_checked_config_module(sys.modules[__name__])
