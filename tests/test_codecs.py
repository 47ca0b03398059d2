"""Codecs: round-trip error bounds on ragged runs, groups that never cross a run, bit packing,
copying encoded runs, and parameters that round-trip through a header."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompile.codecs import QUANTS, codec_from_entry, copy_runs, layer_codecs, make_codec
from kvcompile.codecs.integer import pack_bits, row_groups, unpack_bits
from kvcompile.errors import OptionError, PackError
from kvcompile.ragged import runs as runs_of

RUNS = [7, 0, 33, 1, 12, 64, 5]  # ragged: empty, single-row and partial-group runs


def keys_like(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Pre-RoPE keys have channels with large offsets and scales (KIVI): give some."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 4 + torch.randn(d, generator=g) * 8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per, group", [("channel", 32), ("channel", 5), ("token", 16), ("token", 64)])
def test_int_roundtrip_is_within_half_a_step(bits, per, group):
    codec = make_codec("int", bits=bits, per=per, group=group)
    x = keys_like(sum(RUNS), 64)
    encoded = codec.encode(x, RUNS)
    assert {r: (str(t.dtype), tuple(t.shape)) for r, t in encoded.items()} == {
        r: ({"U8": "torch.uint8", "F16": "torch.float16"}[d], s) for r, (d, s) in codec.layout(RUNS, 64).items()}
    y = codec.decode(encoded, RUNS, 64)
    assert y.dtype == torch.float32 and y.shape == x.shape
    groups = codec._groups(RUNS, "cpu")
    scale = codec._per_row(encoded["scales"], groups)
    zero = codec._per_row(encoded["zeros"], groups)
    # half a quantisation step, plus the fp16 rounding of the zero (the group's minimum)
    bound = scale / 2 + zero.abs() * 2**-11 + 1e-5
    assert ((y - x).abs() <= bound).all()
    step = (x.max() - x.min()) / ((1 << bits) - 1)
    assert (y - x).abs().mean() < step  # far below the bound over the whole range


def test_error_shrinks_with_bits():
    x = keys_like(sum(RUNS), 64, seed=3)
    errors = [(make_codec("int", bits=b, per="channel", group=32).roundtrip(x, RUNS) - x).norm() / x.norm()
              for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_constant_channels_and_single_rows_decode_exactly_without_nan():
    x = keys_like(sum(RUNS), 16)
    x[:, 3] = 2.5  # a constant channel: zero range
    codec = make_codec("int", bits=2, per="channel", group=8)
    y = codec.roundtrip(x, RUNS)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 3], torch.full_like(y[:, 3], 2.5))
    # a run of one row is its own group: each channel decodes to its (fp16) value
    one = sum(RUNS[:3])
    assert torch.allclose(y[one], x[one].half().float())


def test_groups_never_cross_a_run():
    """A run's encoding depends on that run alone: the blocks of a layer's encoding are the
    encodings of its runs, so a reused segment keeps its bytes whatever its neighbours."""
    x = keys_like(sum(RUNS), 32, seed=5)
    for codec in (make_codec("int", bits=3, per="channel", group=8), make_codec("int", bits=4, per="token", group=8),
                  make_codec("int", bits=2, per="channel", group=8, outliers=0.15)):
        whole = codec.encode(x, RUNS)
        at, starts = 0, {r: 0 for r in whole}
        for run in RUNS:
            alone = codec.encode(x[at : at + run], [run])
            for role, t in alone.items():
                n = codec.units(role, run)
                assert torch.equal(whole[role][starts[role] : starts[role] + n], t)
                starts[role] += n
            at += run


def test_copy_runs_moves_encoded_blocks():
    codec = make_codec("int", bits=2, per="channel", group=4)
    a_runs, b_runs = [5, 9, 3], [3, 6, 5]
    a = codec.encode(keys_like(17, 16, seed=1), a_runs)
    b = codec.encode(keys_like(14, 16, seed=2), b_runs)
    b_before = {r: t.clone() for r, t in b.items()}
    copy_runs(codec, b, b_runs, a, a_runs, [(2, 0), (0, 2)])  # a's run 0 -> b's run 2, a's run 2 -> b's run 0
    decoded_a = codec.decode(a, a_runs, 16)
    decoded_b = codec.decode(b, b_runs, 16)
    assert torch.equal(decoded_b[9:14], decoded_a[:5]) and torch.equal(decoded_b[:3], decoded_a[14:17])
    assert torch.equal(decoded_b[3:9], codec.decode(b_before, b_runs, 16)[3:9])  # run 1 untouched


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_is_a_dense_little_endian_stream(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (11, 24), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (11, 24 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 24), codes)
    # code j of a row occupies bits [bits * j, bits * (j + 1)) of the row's stream
    stream = int.from_bytes(bytes(packed[4].tolist()), "little")
    assert [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(24)] == codes[4].tolist()


def test_row_groups_restart_at_every_run():
    groups, n = row_groups([3, 0, 5], 2)
    assert groups.tolist() == [0, 0, 1, 2, 2, 3, 3, 4] and n == 5


def test_runs_split_heads_at_boundaries():
    positions = torch.tensor([0, 1, 5, 9, 12, 2, 7, 8])  # head 0: 5 rows, head 1: 3 rows
    assert runs_of(positions, [5, 3], [3, 8]) == [2, 1, 2, 1, 1, 1]


@pytest.mark.parametrize("entry, problem", [
    ({"codec": "int", "bits": 5, "per": "channel", "group": 32}, "bits"),
    ({"codec": "int", "bits": 4, "per": "diagonal", "group": 32}, "per"),
    ({"codec": "int", "bits": 4, "per": "token", "group": 0}, "group"),
    ({"codec": "int", "bits": 4.0, "per": "token", "group": 32}, "bits"),
    ({"codec": "int", "bits": 4, "per": "token"}, "group"),
    ({"codec": "fp16", "bits": 16}, "bits"),
])
def test_bad_codec_parameters_are_a_corrupt_pack(entry, problem):
    with pytest.raises(PackError, match=f"corrupt pack.*{problem}"):
        codec_from_entry({**entry, "tensors": {}})


def test_parameters_round_trip_through_an_entry():
    for codec in (make_codec("fp16"), make_codec("int", bits=3, per="channel", group=17)):
        assert codec_from_entry({"codec": codec.name, **codec.params(), "tensors": {}}) == codec


def test_layer_codecs_follow_the_quant_choice():
    assert set(QUANTS) >= {"none", "int8", "int4", "int3", "int2", "kvmix"}
    (k, v), = layer_codecs("int4", "fp16", 64, 32, [(4, 4)])
    assert k.params() == {"bits": 4, "per": "channel", "group": 32}
    assert v.params() == {"bits": 4, "per": "token", "group": 32}
    (k, v), = layer_codecs("int2", "fp16", 16, 32, [(2, 2)])
    assert v.params()["group"] == 16  # never wider than a head
    with pytest.raises(OptionError, match="multiple of 8"):
        layer_codecs("int4", "fp16", 12, 32, [(4, 4)])
    with pytest.raises(OptionError, match="does not divide"):
        layer_codecs("int4", "fp16", 48, 32, [(4, 4)])


@pytest.mark.parametrize("per", ["channel", "token"])
def test_outliers_are_stored_exactly_and_leave_the_grid_to_the_rest(per):
    x = keys_like(sum(RUNS), 32, seed=7)
    x[3] *= 40  # a row far outside the others' range: an attention sink's key, say
    plain = make_codec("int", bits=2, per=per, group=8)
    split = make_codec("int", bits=2, per=per, group=8, outliers=0.1)
    encoded = split.encode(x, RUNS)
    assert {r: tuple(t.shape) for r, t in encoded.items()} == {r: s for r, (_, s) in split.layout(RUNS, 32).items()}
    assert encoded["outliers"].shape[0] == sum(math.ceil(0.1 * r) for r in RUNS)
    y = split.decode(encoded, RUNS, 32)
    assert torch.equal(y[3], x[3].half().float())  # the worst row of its run is the exact one
    run0 = slice(0, RUNS[0])  # the outlier's run: the others' grid no longer stretches to it
    assert (y - x)[run0].norm() < (plain.roundtrip(x, RUNS) - x)[run0].norm() / 4
    assert (y - x).norm() < (plain.roundtrip(x, RUNS) - x).norm()
    assert split.params()["outliers"] == 0.1 and codec_from_entry({"codec": "int", **split.params()}) == split


def test_outlier_rows_outside_their_run_are_a_corrupt_pack():
    codec = make_codec("int", bits=4, per="channel", group=8, outliers=0.2)
    encoded = codec.encode(keys_like(sum(RUNS), 16), RUNS)
    encoded["outlier_rows"][0] = RUNS[0]  # one past its run's end
    with pytest.raises(PackError, match="outside its run"):
        codec.decode(encoded, RUNS, 16)


def test_rvq_error_falls_with_depth_and_is_deterministic():
    x = keys_like(600, 32, seed=11)
    errors = []
    for depth in (1, 2, 4):
        codec = make_codec("rvq", depth=depth, size=16, group=8, interleave=True)
        encoded = codec.encode(x, [600])
        layout = codec.layout([600], 32)
        assert {r: tuple(t.shape) for r, t in encoded.items()} == {r: s for r, (_, s) in layout.items()}
        again = codec.encode(x, [600])
        assert all(torch.equal(encoded[r], again[r]) for r in encoded)  # fixed seed: equal bytes
        errors.append(float((codec.decode(encoded, [600], 32) - x).norm() / x.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.25


def test_rvq_interleaves_key_channels():
    codec = make_codec("rvq", depth=1, size=4, group=2, interleave=True)
    y = torch.arange(8.0)[None]
    assert codec._split(y).tolist() == [[[0, 4], [1, 5], [2, 6], [3, 7]]]  # sub-vector j: channels j, j + 4
    assert torch.equal(codec._join(codec._split(y)), y)


def test_rvq_codebooks_stay_under_a_tenth():
    codec = make_codec("rvq", depth=4, size=256, group=32, interleave=False)
    for rows in (100, 5_000, 1_000_000):
        fitted = codec.fit(rows, 64)
        books = fitted.depth * fitted.size * fitted.group * 2
        assert books <= 0.1 * (rows * (2 * 4 + 2) + books) or fitted.size == 2
    assert codec.fit(1_000_000, 64).size == 256 and codec.fit(100, 64).size < 16


def test_rvq_code_past_its_codebook_is_a_corrupt_pack():
    codec = make_codec("rvq", depth=2, size=4, group=8, interleave=False)
    encoded = codec.encode(keys_like(40, 16), [40])
    encoded["codes"][3, 1] = 4
    with pytest.raises(PackError, match="past its codebook"):
        codec.decode(encoded, [40], 16)
