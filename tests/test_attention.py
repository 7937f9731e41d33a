"""AttentionSimilarity against the authors' materialising computation (ALPA/reference.py)."""
import pytest
import torch

from ALPA import attention
from ALPA.attention import AGGREGATIONS, AlignmentStats, AttentionSimilarity
from ALPA.reference import reference_similarity

C = 12  # channels of the toy maps


def make(aggregation="mean", inner_size=8, drop_prob=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return AttentionSimilarity(C, inner_size, aggregation=aggregation,
                               drop_prob=drop_prob).to(dtype)


def maps(n, h=2, w=2, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, h, w, generator=gen, dtype=dtype).requires_grad_(True)


def grads(output, inputs, seed=2):
    """Gradients of a random linear functional of ``output`` (so every entry matters)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(output.shape, generator=gen, dtype=output.dtype)
    return torch.autograd.grad((output * weight).sum(), inputs)


def assert_matches_reference(module, fa, fb, ours_b, atol):
    params = list(module.parameters())
    inputs = [fa] if ours_b is None or ours_b is fa else [fa, fb]
    ours = module(fa, ours_b)
    ref = reference_similarity(module, fa, fb)
    assert ours.shape == (fa.shape[0], fb.shape[0])
    torch.testing.assert_close(ours, ref, rtol=atol, atol=atol)
    for g_ours, g_ref in zip(grads(ours, inputs + params), grads(ref, inputs + params)):
        torch.testing.assert_close(g_ours, g_ref, rtol=atol, atol=atol)


# (H, W, d): HW < d, HW > d, non-square maps, a single position
SHAPES = [(2, 2, 8), (3, 3, 6), (2, 3, 8), (1, 1, 8)]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("h,w,d", SHAPES)
def test_two_sets_match_reference(aggregation, h, w, d):
    module = make(aggregation, d)
    fa, fb = maps(5, h, w, seed=1), maps(3, h, w, seed=3)
    assert_matches_reference(module, fa, fb, fb, atol=1e-7)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("h,w,d", SHAPES[:2])
def test_one_set_matches_reference(aggregation, h, w, d):
    """The training call attention(maps, maps) takes the one-direction shortcut."""
    module = make(aggregation, d)
    fa = maps(6, h, w)
    assert_matches_reference(module, fa, fa, fa, atol=1e-7)
    assert_matches_reference(module, fa, fa, None, atol=1e-7)


def test_float32_matches_reference():
    module = make("logsum", 16, dtype=torch.float32)
    fa, fb = maps(8, 4, 4, torch.float32, seed=1), maps(7, 4, 4, torch.float32, seed=3)
    assert_matches_reference(module, fa, fb, fb, atol=1e-5)
    assert_matches_reference(module, fa, fa, fa, atol=1e-5)


def test_shortcut_equals_general_path():
    module = make("mean")
    fa = maps(6)
    shortcut = module(fa, fa)
    general = module(fa, fa.detach().clone())
    torch.testing.assert_close(shortcut, general, rtol=1e-12, atol=1e-12)


def test_symmetric_on_one_set():
    module = make("max")
    fa = maps(7)
    sim = module(fa, fa.detach().clone())  # general path: both directions computed
    torch.testing.assert_close(sim, sim.T, rtol=1e-12, atol=1e-12)


def test_swapping_sets_transposes():
    module = make("logsum")
    fa, fb = maps(5, seed=1), maps(3, seed=3)
    torch.testing.assert_close(module(fa, fb), module(fb, fa).T, rtol=1e-12, atol=1e-12)


def test_similarity_bounds():
    """Each c_i is a sum of two cosines, so max over positions stays within [-2, 2]."""
    module = make("max")
    fa = maps(4)
    sim = module(fa)
    assert sim.shape == (4, 4)
    assert (sim <= 2 + 1e-12).all() and (sim >= -2 - 1e-12).all()


def test_state_dict_keys_are_the_authors():
    module = AttentionSimilarity(16, 8)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {f"{p}.{i}.weight": (16, 16) if i == 0 else (8, 16)
                      for p in ("query", "key", "value") for i in (0, 2)}
    assert list(shapes)[:2] == ["query.0.weight", "query.2.weight"]
    # A checkpoint stored under those keys loads strictly and is used as-is.
    stored = {k: torch.randn(s) for k, s in shapes.items()}
    module.load_state_dict(stored, strict=True)
    assert torch.equal(module.value[2].weight, stored["value.2.weight"])


def test_unknown_aggregation_rejected():
    with pytest.raises(ValueError, match="aggregation"):
        AttentionSimilarity(8, 4, aggregation="median")


def test_mismatched_maps_rejected():
    module = make()
    with pytest.raises(ValueError):
        module(maps(2, 2, 2), maps(2, 3, 3))


def test_dropout_changes_train_output_only():
    plain, dropped = make("mean", drop_prob=0.0), make("mean", drop_prob=0.5)
    dropped.load_state_dict(plain.state_dict())
    fa = maps(5)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(fa), plain(fa), rtol=0, atol=0)
    dropped.train()
    torch.manual_seed(10)
    first = dropped(fa)
    torch.manual_seed(11)
    second = dropped(fa)
    assert not torch.allclose(first, plain(fa))
    assert not torch.allclose(first, second)
    grad, = torch.autograd.grad(first.sum(), fa)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("tile", [None, 1, 2])
@pytest.mark.parametrize("drop_prob", [0.0, 0.4])
def test_alignment_stats_gradcheck(drop_prob, tile, monkeypatch):
    """The hand-written backward, dropout included (the mask is re-drawn from one seed), in
    one tile and in tiles of 1 and 2 of the 3 sets b (the last one short)."""
    if tile is not None:
        monkeypatch.setattr(attention, "TILE_ELEMENTS", tile * 4 * 6)   # m = 4, X = 6
        assert attention.tile_size(3, 4, 6, torch.device("cpu")) == tile
    gen = torch.Generator().manual_seed(0)
    num_x, num_b, m, d = 6, 3, 4, 5
    inputs = [torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
              for shape in [(num_x, d), (num_x, d), (num_b, m, d), (num_b, m, d)]]

    def stats(*args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return AlignmentStats.apply(*args, drop_prob)

    assert torch.autograd.gradcheck(stats, inputs)


def test_backward_twice_through_retained_graph():
    """Backward works in buffers of its own, so a retained graph gives the same gradients."""
    module = make()
    fa = maps(4)
    sim = module(fa)
    first, = torch.autograd.grad(sim.sum(), fa, retain_graph=True)
    second, = torch.autograd.grad(sim.sum(), fa)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_large_inputs_stay_finite():
    module = make("logsum")
    fa = (maps(5).detach() * 1e3).requires_grad_(True)
    sim = module(fa)
    grad, = torch.autograd.grad(sim.sum(), fa)
    assert torch.isfinite(sim).all() and torch.isfinite(grad).all()


def test_zero_values_give_zero_similarity_and_finite_gradients():
    """Dead value vectors (all ReLU units off): cosines are 0 as in F.cosine_similarity."""
    module = make("mean")
    with torch.no_grad():
        module.value[2].weight.zero_()
    fa, fb = maps(4, seed=1), maps(3, seed=3)
    sim = module(fa, fb)
    torch.testing.assert_close(sim, reference_similarity(module, fa, fb), rtol=0, atol=0)
    assert torch.equal(sim, torch.zeros_like(sim))
    for grad in torch.autograd.grad(sim.sum(), [fa, fb] + list(module.parameters())):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("tile", [1, 3, 5])
def test_tiles_give_the_one_tile_numbers(tile, monkeypatch):
    """fp32 at the training shape's kind (4×4 maps, one set): tiles of 1, 3 and 5 of the 7
    maps give the single tile's forward to the bit and its gradients to rounding."""
    module = make("mean", 16, dtype=torch.float32)
    fa = maps(7, 4, 4, torch.float32)
    whole = module(fa)
    whole_grads = grads(whole, [fa] + list(module.parameters()))
    monkeypatch.setattr(attention, "TILE_ELEMENTS", tile * 16 * 7 * 16)
    assert attention.tile_size(7, 16, 7 * 16, torch.device("cpu")) == tile
    tiled = module(fa)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=0)
    for g_tiled, g_whole in zip(grads(tiled, [fa] + list(module.parameters())), whole_grads):
        torch.testing.assert_close(g_tiled, g_whole, rtol=1e-5, atol=1e-6)


def test_tiled_two_sets_match_reference(monkeypatch):
    monkeypatch.setattr(attention, "TILE_ELEMENTS", 2 * 4 * 5 * 4)   # 2 of the 3 maps b a tile
    module = make("logsum", 8)
    fa, fb = maps(5, 2, 2, seed=1), maps(3, 2, 2, seed=3)
    assert_matches_reference(module, fa, fb, fb, atol=1e-7)


def test_a_gpu_tiles_from_its_free_memory(monkeypatch):
    """A GPU's tile: 1/16 of the free memory per work buffer, at most 1 GiB, read once per device
    (512 views of 7x7 maps: one whole [Nb, m, X] fp32 buffer is 2.4 GiB)."""
    calls = []
    monkeypatch.setattr(attention, "_cuda_tile_bytes", {})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: calls.append(d) or (free, 80 << 30))
    free = 4 << 30                                     # 4 GiB free: 256 MiB a buffer
    nb, m = 512, 49
    assert attention.tile_size(nb, m, nb * m, torch.device("cuda", 0)) == (256 << 20) // 4 // (m * nb * m)
    free = 64 << 30                                    # plenty free: the 1 GiB cap
    assert attention.tile_size(nb, m, nb * m, torch.device("cuda", 1)) == (1 << 30) // 4 // (m * nb * m)
    assert attention.tile_size(nb, m, nb * m, torch.device("cuda", 1), 8) == (1 << 30) // 8 // (m * nb * m)
    assert calls == [0, 1]                             # once per device
    assert attention.tile_size(256, 16, 4096, torch.device("cuda", 0)) == 256   # small steps: one tile
    assert attention.tile_size(256, 16, 4096, torch.device("cpu")) == 8
