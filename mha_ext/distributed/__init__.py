"""Sequence-parallel attention over torch.distributed: each rank holds a shard of the sequence.

* :func:`ring_attention`: key/value shards travel around the ring of ranks; any head count.
* :func:`ulysses_attention`: all-to-all between sequence shards and head shards; heads divisible by the
  group size.
* :func:`shard` / :func:`unshard`: a full-length tensor to this rank's shard and back, "contiguous" or
  "zigzag" (balanced causal work).
* :func:`count_traffic`: the bytes this rank sends.
* :class:`SequenceParallel`: runs an ``mha_ext.nn.MultiheadAttention`` on sequence shards.
* :func:`sequence_parallel`: wraps every ``mha_ext.nn.MultiheadAttention`` of a model in a :class:`SequenceParallel`.

Mask conventions are the single-device op's: bool ``attn_mask`` True = attend, floating masks added; a
mask's rows are this rank's query rows, its columns the whole key sequence. Results equal the single-device
op on the gathered tensors (dropout included) and do not depend on timing. See docs/distributed.md.
"""

from ._comm import Traffic, count_traffic
from ._layout import LAYOUTS, shard, unshard
from .layers import SequenceParallel, sequence_parallel
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard", "unshard", "count_traffic", "Traffic", "LAYOUTS",
           "SequenceParallel", "sequence_parallel"]
