"""Batching: padding, determinism, and packing isolation checked against a tiny random Llama."""

import pytest
import torch
import torch.nn.functional as F

from lorafit.data import IGNORE, Sample, batches, block_causal_mask, model_inputs, pack


def make_samples(n=7, seed=0, vocab=100):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Sample(ids, [IGNORE] * cut + ids[cut:], f"row {i}"))
    return out


def kw(**over):
    base = dict(micro_batch_size=2, sequence_len=24, pad_id=0, packing=False, shuffle=True, seed=3, epoch=0)
    return {**base, **over}


def test_unpacked_batches_pad_right_and_mask_pads():
    samples = make_samples()
    bs = batches(samples, **kw(shuffle=False))
    assert len(bs) == 4 and bs[-1]["input_ids"].shape[0] == 1
    b = bs[0]
    n0, n1 = len(samples[0]), len(samples[1])
    width = max(n0, n1)
    assert b["input_ids"].shape == (2, width)
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (width - n0)
    assert b["labels"][0, n0:].eq(IGNORE).all() and b["labels"][1, n1:].eq(IGNORE).all()
    assert b["labels"][0, 1:n0].tolist() == samples[0].labels[1:n0]
    assert b["num_trained_tokens"] == int((b["labels"][:, 1:] != IGNORE).sum())
    assert sum(x["num_trained_tokens"] for x in bs) == sum(s.num_trained for s in samples)
    padded = batches(samples, **kw(pad_to_sequence_len=True))
    assert all(x["input_ids"].shape[1] == 24 for x in padded)
    assert set(model_inputs(b)) == {"input_ids", "attention_mask"}


def test_batches_are_deterministic_per_seed_and_epoch():
    samples = make_samples(20)
    for packing in (False, True):
        a = batches(samples, **kw(packing=packing))
        b = batches(samples, **kw(packing=packing))
        c = batches(samples, **kw(packing=packing, epoch=1))
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
        assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=False))


def test_pack_first_fit_keeps_whole_samples():
    rows = pack([5, 9, 4, 7, 3], [0, 1, 2, 3, 4], capacity=10)
    assert rows == [[0, 2], [1], [3, 4]]
    with pytest.raises(ValueError):
        pack([11], [0], capacity=10)


def test_packed_layout_positions_restart():
    samples = make_samples(9)
    bs = batches(samples, **kw(packing=True, micro_batch_size=1))
    assert sum(int((b["seq_ids"][0] != b["seq_ids"][0, -1]).sum()) for b in bs) <= sum(map(len, samples))
    seen = 0
    for b in bs:
        pos, sid = b["position_ids"][0], b["seq_ids"][0]
        assert b["input_ids"].shape[1] <= 24
        for k in sid.unique().tolist():
            where = (sid == k).nonzero().flatten()
            assert pos[where].tolist() == list(range(len(where)))
            assert b["labels"][0, where[0]] == IGNORE  # no sample is trained to predict the next one's start
        seen += int((b["labels"][:, 1:] != IGNORE).sum())
    assert seen == sum(s.num_trained for s in samples)
    inputs = model_inputs(bs[0])
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"} and inputs["use_cache"] is False


def test_block_causal_mask():
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def token_losses(model, batch, **mi):
    logits = model(**model_inputs(batch, **mi)).logits.float()
    labels = batch["labels"]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    return loss  # (B, L-1); zero where ignored


@pytest.fixture(scope="module")
def tiny_llama_factory():
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(attn):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cfg._attn_implementation = attn
        return LlamaForCausalLM(cfg).eval()

    return build


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", ["auto", "4d"])
def test_packed_samples_do_not_see_each_other(tiny_llama_factory, attn, mask):
    model = tiny_llama_factory(attn)
    samples = make_samples(8, seed=1)
    args = kw(shuffle=False, micro_batch_size=2)
    expected = {}
    with torch.no_grad():
        for b in batches(samples, **{**args, "micro_batch_size": 1}):
            (i,) = [k for k, s in enumerate(samples) if s.input_ids == b["input_ids"][0].tolist()]
            expected[i] = token_losses(model, b).sum().item()
        packed = batches(samples, **{**args, "packing": True})
        assert len(packed) < len(samples)  # rows really hold several samples
        got = {}
        for b in packed:
            losses = token_losses(model, b, mask=mask)
            for r in range(b["input_ids"].shape[0]):
                sid = b["seq_ids"][r]
                pos = 0
                for k in range(int(sid.max()) + 1):
                    n = int((sid == k).sum())
                    ids = b["input_ids"][r, pos : pos + n].tolist()
                    match = [j for j, s in enumerate(samples) if s.input_ids == ids]
                    if match:  # padding block has no match
                        # loss at position t predicts token t+1: sample k's losses are pos..pos+n-2
                        got[match[0]] = losses[r, pos : pos + n - 1].sum().item()
                    pos += n
    assert set(got) == set(expected)
    for i in expected:
        assert got[i] == pytest.approx(expected[i], abs=1e-5), i


def test_packing_without_isolation_would_differ(tiny_llama_factory):
    """Guards the test above: with a plain causal mask over the row, losses change."""
    model = tiny_llama_factory("sdpa")
    samples = make_samples(8, seed=1)
    b = batches(samples, **kw(shuffle=False, packing=True))[0]
    with torch.no_grad():
        iso = token_losses(model, b)
        leaky = model(input_ids=b["input_ids"]).logits.float()
    leak = F.cross_entropy(leaky[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
    assert not torch.allclose(iso, leak, atol=1e-4)


@pytest.mark.parametrize("curriculum", [False, True])
def test_curriculum_sampling_reads_rows_in_the_data_order(tmp_path, curriculum):
    """axolotl's curriculum_sampling: a sequential sampler; without it the rows are shuffled with the seed."""
    from lorafit.config import TrainConfig
    from lorafit.data.build import Sample
    from lorafit.train.recipe import Recipe

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')  # the fingerprint hashes the data file
    cfg = TrainConfig.from_dict({"base_model": "demo", "datasets": [{"path": "d.jsonl", "type": "completion"}],
                                 "output_dir": str(tmp_path / "out"), "curriculum_sampling": curriculum},
                                config_dir=tmp_path)
    recipe = Recipe(cfg)
    recipe.train_samples = [Sample([i + 1] * 3, [i + 1] * 3) for i in range(16)]
    recipe.pad_id = 0
    firsts = [int(b["input_ids"][0, 0]) for b in recipe.epoch_batches(0)]
    assert (firsts == list(range(1, 17))) is curriculum
    assert sorted(firsts) == list(range(1, 17))
