"""One guidance module, one sampling-filter module, used by both samplers (generation/guidance.py,
generation/sampling.py): the CFG formula, one meaning of "off" (None and 1.0: conditional logits, one pass),
top-k / top-p against brute force, the two draws, and the diffusion sampler against its pre-refactor formula."""
import math

import pytest
import torch
import torch.nn.functional as F

from generation import conditioning
from generation.ar_model import ARGenerator, get_ar_config
from generation.diffusion import sampler as diffusion_sampler
from generation.diffusion.masking import MaskSchedule
from generation.diffusion.model import JointDiffusionTransformer, get_config
from generation.diffusion.sampler import SamplerOptions, guided_model_logits, reveal_count, sample, unmask_step
from generation.guidance import OFF_SCALES, cfg_combine, guidance_on
from generation.sample import generate
from generation.sampling import check_sampling_args, choose, filter_logits, gumbel_choose

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V, K = 40, 32   # diffusion text vocabulary, codebook size


# --------------------------------------------------------------------------------------------------
# guidance

def test_cfg_combine_is_u_plus_s_times_c_minus_u():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 5, 17, generator=g), torch.randn(3, 5, 17, generator=g)
    for s in (0.0, 0.5, 1.5, 3.0, 7):
        assert torch.equal(cfg_combine(c, u, s), u + s * (c - u)), s
    assert torch.equal(cfg_combine(c, u, 0.0), u)   # 0 = the unconditional prediction
    # one formula: the old names of both samplers are this function
    assert conditioning.guided_logits is cfg_combine and diffusion_sampler.combine_guidance is cfg_combine


@pytest.mark.parametrize("off", OFF_SCALES)
def test_both_spellings_of_off_return_the_conditional_logits(off):
    c, u = torch.randn(2, 9), torch.randn(2, 9)
    assert not guidance_on(off)
    assert cfg_combine(c, u, off) is c and cfg_combine(c, None, off) is c   # u is not even read
    assert guidance_on(0.0) and guidance_on(2.0)
    with pytest.raises(ValueError, match="needs the unconditional logits"):
        cfg_combine(c, None, 2.0)


def test_the_same_scales_are_refused_by_both_samplers():
    for bad in (-1.0, -0.01, float("nan")):
        with pytest.raises(ValueError, match="CFG scale must be >= 0"):
            guidance_on(bad)
        with pytest.raises(ValueError, match="CFG scale must be >= 0"):
            SamplerOptions(cfg_scale=bad)
        with pytest.raises(ValueError, match="CFG scale must be >= 0"):
            check_sampling_args(1.0, 0, 1.0, bad)
    for good in (None, 0.0, 1.0, 2.5):
        SamplerOptions(cfg_scale=good)
        check_sampling_args(1.0, 0, 1.0, good)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplerOptions(top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        SamplerOptions(top_k=-1)


@pytest.fixture(scope="module")
def diffusion_model():
    cfg = get_config("tiny", text_vocab_size=V, codebook_size=K, grid=(3, 3), text_len=8,
                     condition_names=["ct", "mri"], condition_dropout=0.0)
    torch.manual_seed(0)
    m = JointDiffusionTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # random non-zero weights: a model whose predictions depend on everything
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def given(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return (torch.randint(0, V, (b, cfg.text_len), generator=g),
            torch.randint(0, K, (b, cfg.num_codebooks, cfg.num_positions), generator=g),
            torch.tensor([0, 1, 2])[:b])


def count_calls(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(args[-1].clone()))
    return calls, handle


def test_diffusion_off_skips_the_unconditional_pass(diffusion_model):
    text, _, labels = given(diffusion_model)
    runs = {}
    for scale in (None, 1.0, 2.0):
        calls, handle = count_calls(diffusion_model)
        try:
            runs[scale] = sample(diffusion_model, task="text_to_image", labels=labels, text_ids=text,
                                 options=SamplerOptions(steps=3, cfg_scale=scale), generator=torch.Generator().manual_seed(4))
        finally:
            handle.remove()
        null_calls = sum(bool((c == diffusion_model.null_label).all()) for c in calls)
        assert (len(calls), null_calls) == ((6, 3) if scale == 2.0 else (3, 0)), scale
    assert torch.equal(runs[None][1], runs[1.0][1]) and not torch.equal(runs[None][1], runs[2.0][1])
    # and guided_model_logits itself: conditional logits unchanged, one call
    t = torch.full((3,), 0.6)
    masked = torch.full((3, 8, 9), K)
    cond = diffusion_model(text, masked, torch.zeros(3), t, labels)
    for off in OFF_SCALES:
        calls, handle = count_calls(diffusion_model)
        try:
            out = guided_model_logits(diffusion_model, text, masked, torch.zeros(3), t, labels, off, "text")
        finally:
            handle.remove()
        assert len(calls) == 1 and torch.equal(out[0], cond[0]) and torch.equal(out[1], cond[1])


def tiny_ar(seed=1):
    torch.manual_seed(seed)
    return ARGenerator(get_ar_config("tiny", grid=(3, 3), codebook_size=32, num_labels=3)).eval()


def test_ar_off_skips_the_unconditional_pass():
    model = tiny_ar()
    labels = torch.tensor([0, 2, 1])
    seen = []
    original = model.head.codebook_logits

    def counting(state, codes, k):
        seen.append(state.shape[0])
        return original(state, codes, k)

    model.head.codebook_logits = counting
    runs = {}
    for scale in (None, 1.0, 2.0):
        seen.clear()
        runs[scale] = generate(model, labels, generator=torch.Generator().manual_seed(2), cfg_scale=scale)
        # each code's logits come from one batch: B rows (conditional only) or 2B (conditional + unconditional)
        assert set(seen) == ({6} if scale == 2.0 else {3}) and len(seen) == 8 * 9, scale
    assert torch.equal(runs[None], runs[1.0]) and not torch.equal(runs[None], runs[2.0])


def test_the_diffusion_cli_accepts_the_same_off_values():
    from generation.diffusion.sample import build_parser

    args = build_parser().parse_args(["--checkpoint", "x.pt", "--task", "joint"])
    assert args.cfg_scale == 1.0 and not guidance_on(args.cfg_scale) and args.top_k == 0 and args.top_p == 1.0


# --------------------------------------------------------------------------------------------------
# filtering and the draws

def brute_force_keep(row, top_k, top_p):
    """The set of token indices top-k then top-p keeps, by sorting a Python list."""
    values = row.tolist()
    keep = set(range(len(values)))
    if 0 < top_k < len(values):
        kth = sorted(values, reverse=True)[top_k - 1]
        keep = {i for i in keep if values[i] >= kth}
    if top_p < 1.0:
        kept = sorted(keep, key=lambda i: -values[i])
        z = sum(math.exp(values[i]) for i in kept)
        mass, nucleus = 0.0, set()
        for i in kept:
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += math.exp(values[i]) / z
        keep = nucleus
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.3), (0, 0.9), (8, 0.7), (100, 0.5)])
def test_filter_logits_matches_brute_force(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    logits = torch.randn(6, 3, 20, generator=g) * 2          # [..., V]: every leading index is a row
    if top_p == 1.0:   # ties: top-k keeps every token tied with the k-th (top-p among ties depends on sort order)
        logits[0, 0, :4] = logits[0, 0].max() + 1
        logits[1, 2, 5:9] = logits[1, 2].sort(descending=True).values[4]
    filtered = filter_logits(logits, top_k, top_p)
    for index in range(6 * 3):
        row, out = logits.view(-1, 20)[index], filtered.view(-1, 20)[index]
        keep = brute_force_keep(row, top_k, top_p)
        assert {i for i in range(20) if torch.isfinite(out[i])} == keep, index
        assert torch.equal(out[sorted(keep)], row[sorted(keep)])   # kept logits unchanged
    if top_k == 0 and top_p == 1.0:
        assert filtered is logits


def test_choose_inverts_the_cdf_of_the_filtered_tempered_distribution():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, generator=g)
    uniform = torch.rand(4, generator=g)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 4, 1.0), (2.0, 0, 0.6), (0.8, 6, 0.8)):
        codes = choose(logits, uniform, temperature, top_k, top_p)
        for b in range(4):
            keep = brute_force_keep(logits[b] / temperature, top_k, top_p)
            probs = [math.exp(logits[b, i].item() / temperature) if i in keep else 0.0 for i in range(12)]
            cdf = [sum(probs[:i + 1]) / sum(probs) for i in range(12)]
            expected = next(i for i in range(12) if cdf[i] >= uniform[b].item())
            assert codes[b].item() == expected
    assert torch.equal(choose(logits, uniform, 0.0), logits.argmax(-1))


def test_gumbel_choose_is_gumbel_max_over_the_filtered_tempered_logits():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 7, 10, generator=g)
    uniform = torch.rand(2, 7, 10, generator=g)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.5)):
        ids = gumbel_choose(logits, uniform, temperature, top_k, top_p)
        for index in range(14):
            row, u = logits.view(-1, 10)[index], uniform.view(-1, 10)[index]
            keep = brute_force_keep(row / temperature, top_k, top_p)
            scores = {i: row[i].item() / temperature - math.log(-math.log(u[i].item())) for i in keep}
            assert ids.view(-1)[index].item() == max(scores, key=scores.get)
    assert torch.equal(gumbel_choose(logits, uniform, 0.0), logits.argmax(-1))
    # many draws of one row: the empirical distribution is the filtered, tempered softmax
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    draws = gumbel_choose(row.expand(20000, 5), torch.rand(20000, 5, generator=g), 0.8, top_k=3)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    torch.testing.assert_close(freq, filter_logits(row / 0.8, top_k=3).softmax(-1), atol=0.015, rtol=0)


def test_diffusion_top_k_one_is_greedy(diffusion_model):
    text, image, labels = given(diffusion_model)
    greedy = sample(diffusion_model, task="joint", labels=labels,
                    options=SamplerOptions(steps=3, temperature=0.0), generator=torch.Generator().manual_seed(0))
    top1 = sample(diffusion_model, task="joint", labels=labels,
                  options=SamplerOptions(steps=3, temperature=1.0, top_k=1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy[0], top1[0]) and torch.equal(greedy[1], top1[1])


# --------------------------------------------------------------------------------------------------
# The diffusion sampler gives the ids it gave before guidance and filtering moved to shared modules: its
# loop, with the pre-refactor guidance (``cfg_scale == 1.0`` → one pass, else u + w·(c − u)) and draw
# (Gumbel-max with the uniforms clamped to [1e-20, 1]) written out here.

def old_guided(model, text_ids, image_ids, t_text, t_image, labels, cfg_scale, condition_part):
    cond = model(text_ids, image_ids, t_text, t_image, labels)
    if cfg_scale == 1.0:
        return cond
    cfg = model.config
    u_text, u_image, ut_text, ut_image = text_ids, image_ids, t_text, t_image
    if condition_part == "text":
        u_text, ut_text = torch.full_like(text_ids, cfg.text_mask_id), torch.ones_like(t_text)
    elif condition_part == "image":
        u_image, ut_image = torch.full_like(image_ids, cfg.image_mask_id), torch.ones_like(t_image)
    uncond = model(u_text, u_image, ut_text, ut_image, torch.full_like(labels, model.null_label))
    return tuple(u + cfg_scale * (c - u) for c, u in zip(cond, uncond))


def old_draw(logits, temperature, generator):
    logp = F.log_softmax(logits.float(), dim=-1)
    if temperature == 0:
        ids = logp.argmax(dim=-1)
    else:
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
        ids = (logits.float() / temperature - torch.log(-torch.log(u))).argmax(dim=-1)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def old_reveal(mask, confidence, n_generated, schedule, t, s, method, generator):
    if s <= 0:
        return mask.clone()
    if method == "confidence":
        return unmask_step(mask, confidence, reveal_count(n_generated, schedule, s))
    m_t, m_s = schedule.mask_prob(torch.tensor(t)).item(), schedule.mask_prob(torch.tensor(s)).item()
    return mask & (torch.rand(mask.shape, generator=generator) < (m_t - m_s) / m_t)


@torch.no_grad()
def old_sample(model, task, labels, text_ids, image_ids, steps, method, temperature, cfg_scale, generator):
    cfg = model.config
    b = labels.shape[0]
    if task in ("image_to_text", "joint"):
        text_ids = torch.full((b, cfg.text_len), cfg.text_mask_id, dtype=torch.long)
    if task in ("text_to_image", "joint"):
        image_ids = torch.full((b, cfg.num_codebooks, cfg.num_positions), cfg.image_mask_id, dtype=torch.long)
    text_ids, image_ids = text_ids.clone(), image_ids.clone()
    gen_text, gen_image = task in ("image_to_text", "joint"), task in ("text_to_image", "joint")
    condition_part = {"text_to_image": "text", "image_to_text": "image", "joint": None}[task]
    schedule = MaskSchedule("loglinear")
    text_mask, image_mask = text_ids == cfg.text_mask_id, (image_ids == cfg.image_mask_id).any(dim=1)
    n_text, n_image = text_mask.sum(dim=1), image_mask.sum(dim=1)
    zeros = torch.zeros(b)
    for i in range(steps):
        t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
        t_vec = torch.full((b,), t)
        text_logits, image_logits = old_guided(model, text_ids, image_ids, t_vec if gen_text else zeros,
                                               t_vec if gen_image else zeros, labels, cfg_scale, condition_part)
        if gen_text:
            ids, logp = old_draw(text_logits, temperature, generator)
            reveal = old_reveal(text_mask, logp, n_text, schedule, t, s, method, generator)
            text_ids, text_mask = torch.where(reveal, ids, text_ids), text_mask & ~reveal
        if gen_image:
            ids, logp = old_draw(image_logits, temperature, generator)
            reveal = old_reveal(image_mask, logp.sum(dim=1), n_image, schedule, t, s, method, generator)
            image_ids, image_mask = torch.where(reveal[:, None, :], ids, image_ids), image_mask & ~reveal
    return text_ids, image_ids


@pytest.mark.parametrize("method", ["confidence", "ancestral"])
@pytest.mark.parametrize("task", ["text_to_image", "image_to_text", "joint"])
def test_diffusion_sampler_ids_are_those_of_the_pre_refactor_formula(diffusion_model, task, method):
    text, image, labels = given(diffusion_model)
    for temperature, cfg_scale in ((1.0, 1.0), (0.7, 2.0), (0.0, 0.0), (1.0, 3.0)):
        new = sample(diffusion_model, task=task, labels=labels, text_ids=text, image_ids=image,
                     options=SamplerOptions(steps=5, method=method, temperature=temperature, cfg_scale=cfg_scale),
                     generator=torch.Generator().manual_seed(7))
        old = old_sample(diffusion_model, task, labels, text, image, 5, method, temperature, cfg_scale,
                         torch.Generator().manual_seed(7))
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), (temperature, cfg_scale)
