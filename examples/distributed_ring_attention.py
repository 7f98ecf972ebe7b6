"""Ring attention over two processes: a causal, key-padded sequence split between the ranks.

Launch (run_all.sh does):

    GLOO_SOCKET_IFNAME=lo torchrun --nnodes 1 --nproc-per-node 2 examples/distributed_ring_attention.py

Each rank holds a "zigzag" shard of the sequence (chunks r and 2P-1-r of 2P, which balances the causal work),
runs ``mha_ext.distributed.ring_attention`` forward and backward on it, and checks its output and gradients
against the single-device ``mha_ext.scaled_dot_product_attention`` on the gathered tensors.
"""

import torch
import torch.distributed as dist

import mha_ext
from mha_ext import masks
from mha_ext.distributed import ring_attention, shard, unshard


def main():
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; gloo runs on the CPU.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # Every rank builds the same full tensors from one seed, then keeps its shard; a real model would only
    # ever hold its shard. The sequence length divides into 2 * world chunks, as "zigzag" needs.
    torch.manual_seed(0)
    batch, heads, length, head_dim = 2, 4, 12 * world, 16
    q, k, v = (torch.randn(batch, heads, length, head_dim, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(batch, heads, length, head_dim, dtype=torch.float64)
    # Key padding in the op's convention (bool, True = attend), (B, 1, 1, S): its columns are the WHOLE key
    # sequence in global order, its rows broadcast, so every rank passes it as it is.
    padding = masks.key_padding_from_lengths(torch.tensor([length, length - 5]), length)

    # This rank's shards along the sequence dim (-2): tensors of (B, H, 12, E) here.
    q_local, k_local, v_local = (shard(t, -2, layout="zigzag").clone().requires_grad_() for t in (q, k, v))
    out_local = ring_attention(q_local, k_local, v_local, attn_mask=padding, is_causal=True, layout="zigzag")
    # is_causal=True is causality over global positions: query i attends keys j <= i, wherever they live.
    out_local.backward(shard(grad_out, -2, layout="zigzag"))

    # The single-device op on the gathered tensors (unshard is a collective: every rank calls it).
    q_full, k_full, v_full = (unshard(t.detach(), -2, layout="zigzag").requires_grad_()
                              for t in (q_local, k_local, v_local))
    out_full = mha_ext.scaled_dot_product_attention(q_full, k_full, v_full, attn_mask=padding, is_causal=True)
    out_full.backward(grad_out)

    out_error = (unshard(out_local.detach(), -2, layout="zigzag") - out_full).abs().max().item()
    grad_error = max((unshard(local.grad, -2, layout="zigzag") - full.grad).abs().max().item()
                     for local, full in ((q_local, q_full), (k_local, k_full), (v_local, v_full)))
    assert out_error < 1e-10 and grad_error < 1e-10, (out_error, grad_error)
    for turn in range(world):   # one line per rank, in rank order (not interleaved)
        if turn == rank:
            print(f"rank {rank} of {world}: {q_local.size(-2)} of {length} positions (zigzag); ring_attention matches "
                  f"the single-device op: output max error {out_error:.1e}, gradients {grad_error:.1e}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
