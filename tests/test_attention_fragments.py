"""The sm8x attention kernel's register packing (sage_attn_kernel.cuh) checked against the PTX fragment
definitions, on the CPU: the P operand is built from the QK accumulator layout exactly as the kernel packs
it, V^T is stored in the layout the kernel reads (FP8: tersor's v_fp8_position_token order), the MMA is
evaluated from the PTX ISA's fragment tables, and the result must be P @ V."""

import torch

from conftest import load_testing_ops

T = load_testing_ops()  # torch.ops.tersor_testing


def lanes():
    return [(lane // 4, lane % 4) for lane in range(32)]


def acc_layout(mat16x8):
    """The m16n8 accumulator fragment: lane (g, t) holds C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]."""
    return [[mat16x8[g][2 * t], mat16x8[g][2 * t + 1], mat16x8[g + 8][2 * t], mat16x8[g + 8][2 * t + 1]]
            for g, t in lanes()]


def mma_m16n8k32_8bit(a_regs, b_regs):
    """PTX m16n8k32 (.s8 / .e4m3): a_regs[lane] = 4 registers of 4 values each (k ascending within a register),
    b_regs[lane] = 2 registers. Returns A (16x32) @ B (32x8)."""
    a = torch.zeros(16, 32, dtype=torch.float64)
    b = torch.zeros(32, 8, dtype=torch.float64)
    for lane, (g, t) in enumerate(lanes()):
        for j in range(4):
            a[g][4 * t + j] = a_regs[lane][0][j]
            a[g + 8][4 * t + j] = a_regs[lane][1][j]
            a[g][16 + 4 * t + j] = a_regs[lane][2][j]
            a[g + 8][16 + 4 * t + j] = a_regs[lane][3][j]
            b[4 * t + j][g] = b_regs[lane][0][j]
            b[16 + 4 * t + j][g] = b_regs[lane][1][j]
    return a @ b


def mma_m16n8k16_16bit(a_regs, b_regs):
    """PTX m16n8k16 (.f16 / .bf16): each register holds 2 values (lower index in the low half)."""
    a = torch.zeros(16, 16, dtype=torch.float64)
    b = torch.zeros(16, 8, dtype=torch.float64)
    for lane, (g, t) in enumerate(lanes()):
        for j in range(2):
            a[g][2 * t + j] = a_regs[lane][0][j]
            a[g + 8][2 * t + j] = a_regs[lane][1][j]
            a[g][8 + 2 * t + j] = a_regs[lane][2][j]
            a[g + 8][8 + 2 * t + j] = a_regs[lane][3][j]
            b[2 * t + j][g] = b_regs[lane][0][j]
            b[8 + 2 * t + j][g] = b_regs[lane][1][j]
    return a @ b


def test_v_fp8_positions_is_a_permutation_of_each_16():
    pos = T._sage_v_fp8_positions(64)
    assert pos[:16] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    for blk in range(4):
        assert sorted(pos[16 * blk:16 * blk + 16]) == list(range(16 * blk, 16 * blk + 16))


def test_fp8_pv_packing_matches_ptx_fragments():
    g_ = torch.Generator().manual_seed(0)
    p = torch.randint(0, 100, (16, 64), generator=g_).double()   # one m-tile's P over a 64-key tile
    v = torch.randint(-50, 50, (64, 8), generator=g_).double()   # one 8-channel n-tile of V
    # s[nt] for nt in 0..7: the QK accumulator fragments of the 8 n-tiles
    s = [acc_layout(p[:, 8 * nt:8 * nt + 8]) for nt in range(8)]
    pos = T._sage_v_fp8_positions(64)
    v_t = torch.stack([v[pos[q]] for q in range(64)], 1)  # V^T [8 channels][64 positions]
    out = torch.zeros(16, 8, dtype=torch.float64)
    for kk in range(2):
        a_regs, b_regs = [], []
        for lane, (g, t) in enumerate(lanes()):
            regs = []
            for r in range(4):  # the kernel's packing: nt = 4kk + (r >= 2 ? 2 : 0), e = (r & 1) * 2
                nt, e = 4 * kk + (2 if r >= 2 else 0), (r & 1) * 2
                regs.append([s[nt][lane][e], s[nt][lane][e + 1], s[nt + 1][lane][e], s[nt + 1][lane][e + 1]])
            a_regs.append(regs)
            # b0 = 4 bytes at [channel g][kk*32 + 4t], b1 = the same + 16
            b_regs.append([v_t[g, kk * 32 + 4 * t: kk * 32 + 4 * t + 4].tolist(),
                           v_t[g, kk * 32 + 16 + 4 * t: kk * 32 + 16 + 4 * t + 4].tolist()])
        out += mma_m16n8k32_8bit(a_regs, b_regs)
    assert torch.equal(out, p @ v)


def test_16bit_pv_packing_matches_ptx_fragments():
    g_ = torch.Generator().manual_seed(1)
    p = torch.randint(0, 100, (16, 64), generator=g_).double()
    v = torch.randint(-50, 50, (64, 8), generator=g_).double()
    s = [acc_layout(p[:, 8 * nt:8 * nt + 8]) for nt in range(8)]
    v_t = v.t()  # natural token order
    out = torch.zeros(16, 8, dtype=torch.float64)
    for kk in range(4):
        a_regs, b_regs = [], []
        for lane, (g, t) in enumerate(lanes()):
            regs = []
            for r in range(4):  # nt = 2kk + (r >= 2), e = (r & 1) * 2
                nt, e = 2 * kk + (1 if r >= 2 else 0), (r & 1) * 2
                regs.append([s[nt][lane][e], s[nt][lane][e + 1]])
            a_regs.append(regs)
            b_regs.append([v_t[g, kk * 16 + 2 * t: kk * 16 + 2 * t + 2].tolist(),
                           v_t[g, kk * 16 + 8 + 2 * t: kk * 16 + 8 + 2 * t + 2].tolist()])
        out += mma_m16n8k16_16bit(a_regs, b_regs)
    assert torch.equal(out, p @ v)


def test_qk_int8_fragments_and_scale_groups():
    """Q K^T from the kernel's A/B loads, with one q_scale x k_scale per accumulator element per lane."""
    g_ = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (32, 64), generator=g_).double()  # one warp's rows, D = 64
    k = torch.randint(-127, 128, (64, 64), generator=g_).double()  # one 64-key tile
    maps = T._sage_group_maps(32, 64)
    qg, kg = maps[:32], maps[32:]
    for mt in range(2):
        for nt in range(8):
            acc = torch.zeros(16, 8, dtype=torch.float64)
            for kk in range(2):
                a_regs, b_regs = [], []
                for lane, (g, t) in enumerate(lanes()):
                    r0, c0 = mt * 16 + g, kk * 32 + 4 * t
                    a_regs.append([q[r0, c0:c0 + 4].tolist(), q[r0 + 8, c0:c0 + 4].tolist(),
                                   q[r0, c0 + 16:c0 + 20].tolist(), q[r0 + 8, c0 + 16:c0 + 20].tolist()])
                    b_regs.append([k[nt * 8 + g, c0:c0 + 4].tolist(), k[nt * 8 + g, c0 + 16:c0 + 20].tolist()])
                acc += mma_m16n8k32_8bit(a_regs, b_regs)
            assert torch.equal(acc, q[mt * 16:mt * 16 + 16] @ k[nt * 8:nt * 8 + 8].t())
            # the kernel uses q_scale[g] and k_scale[t] for all 4 elements of lane (g, t)
            for lane, (g, t) in enumerate(lanes()):
                rows = [mt * 16 + g, mt * 16 + g, mt * 16 + g + 8, mt * 16 + g + 8]
                cols = [nt * 8 + 2 * t, nt * 8 + 2 * t + 1] * 2
                assert {qg[r] for r in rows} == {g} and {kg[c] for c in cols} == {t}
