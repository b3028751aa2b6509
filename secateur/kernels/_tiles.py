"""Triton helpers shared by the channel-wise kernels (TSRA, RMSNorm2d)."""
import triton
import triton.language as tl


@triton.jit
def channel_tile(P, C, INNER, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets, mask and channel mask of this program's tile: BLOCK_P positions x all channels
    of a contiguous (outer, C, inner) tensor (position p = o * INNER + i)."""
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    m = (pos < P)[:, None] & cmask[None, :]
    offs = ((pos // INNER) * C * INNER + pos % INNER)[:, None] + (ch * INNER)[None, :]
    return offs, m, ch, cmask
